"""The service end to end: a real front process, real worker processes, gRPC over loopback."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from service_harness import SERVING, RunningServer, ServerGroup, wait_for
from tokenizers import Tokenizer

from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    # module_servers stops it after the module and checks exit status 0 and no segments left.
    return module_servers.start("--workers", "2", "--max-batch-size", "8", "--kv-cache-mb", "16")


def generate(stub, **fields) -> list[pb.GenerateChunk]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))


def joined(chunks: list[pb.GenerateChunk]) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_greedy_tokens_equal_the_in_process_engine(server: RunningServer, make_processor) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, size=int(n)).tolist() for n in rng.integers(1, 60, size=32)]
    lengths = [int(n) for n in rng.integers(1, 24, size=32)]
    stub = server.stub()
    with ThreadPoolExecutor(32) as pool:
        futures = [
            pool.submit(generate, stub, prompt_token_ids=p, max_new_tokens=n, ignore_eos=True)
            for p, n in zip(prompts, lengths, strict=True)
        ]
        served = [joined(f.result())[0] for f in futures]
    requests = [
        Request(str(i), p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    local = run_to_completion(make_processor(max_batch_size=8), requests)
    assert served == [local[str(i)].token_ids for i in range(32)]


def test_generate_equals_submit_then_stream_and_a_joined_replay(server: RunningServer) -> None:
    stub = server.stub()
    fields = dict(
        prompt="The tide comes in", max_new_tokens=20, temperature=0.9, seed=5, ignore_eos=True
    )
    direct = generate(stub, **fields)
    request_id = stub.Submit(pb.GenerateRequest(**fields)).request_id
    from_zero = list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=0)))
    assert joined(from_zero) == joined(direct)
    head = []
    for chunk in from_zero:
        if chunk.index >= 7:
            break
        head.append(chunk)
    middle = head[-1].index + len(head[-1].token_ids)
    tail = list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=middle)))
    assert joined(head + tail) == joined(direct)
    last = direct[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 20 and last.usage.prompt_tokens > 0
    assert last.timing.total_ms >= last.timing.ttft_ms >= last.timing.queue_ms >= 0


def test_64_concurrent_streams_and_utf8_safe_text(
    server: RunningServer, model_tokenizer: Tokenizer
) -> None:
    tokenizer = model_tokenizer
    stub = server.stub()
    prompts = [f"{i} café 你好 🙂 naïve" for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        futures = [
            pool.submit(
                generate,
                stub,
                prompt=p,
                max_new_tokens=24,
                temperature=1.0,
                seed=i,
                ignore_eos=True,
            )
            for i, p in enumerate(prompts)
        ]
        results = [joined(f.result()) for f in futures]
    multibyte = 0
    for tokens, text in results:
        assert len(tokens) == 24
        assert text == tokenizer.decode(tokens)
        multibyte += any(ord(ch) > 127 for ch in text)
    assert multibyte > 0  # the check saw characters spanning several bytes


def test_stop_strings_end_a_request_and_are_not_emitted(server: RunningServer) -> None:
    stub = server.stub()
    base = dict(prompt_token_ids=[3, 4, 5], max_new_tokens=24, ignore_eos=True)
    _, full = joined(generate(stub, **base))
    stop = full[len(full) // 2 :][:2]
    chunks = generate(stub, **base, stop=[stop])
    _, text = joined(chunks)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert text == full[: full.find(stop)]


def test_bad_requests_are_rejected_without_disturbing_a_running_stream(
    server: RunningServer,
) -> None:
    stub = server.stub()
    running = stub.Generate(
        pb.GenerateRequest(prompt="steady", max_new_tokens=40, ignore_eos=True), timeout=60
    )
    first = next(running)
    bad = [
        (dict(max_new_tokens=4), "prompt"),
        (dict(prompt="x", prompt_token_ids=[1], max_new_tokens=4), "prompt"),
        (dict(prompt="", max_new_tokens=4), "prompt"),
        (dict(prompt_token_ids=[1, 512], max_new_tokens=4), "512"),
        (dict(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="x", max_new_tokens=5000), "max_new_tokens"),
        (dict(prompt_token_ids=[1] * 2040, max_new_tokens=20), "2048"),
        (dict(prompt="x", max_new_tokens=4, temperature=-1), "temperature"),
        (dict(prompt="x", max_new_tokens=4, temperature=float("nan")), "temperature"),
        (dict(prompt="x", max_new_tokens=4, temperature=float("inf")), "temperature"),
        (dict(prompt="x", max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(prompt="x", max_new_tokens=4, top_k=100000), "top_k"),
        (dict(prompt="x", max_new_tokens=4, stop=["s"] * 100), "stop"),
        (dict(prompt="x", max_new_tokens=4, stop=["s" * 10000]), "stop"),
        (dict(prompt="x", max_new_tokens=4, priority=17), "priority"),
        (dict(prompt="x", max_new_tokens=4, request_id="r" * 1000), "request_id"),
    ]
    for fields, named in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(pb.GenerateRequest(**fields), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert named in err.value.details(), (fields, err.value.details())
    stub.Submit(pb.GenerateRequest(request_id="dup", prompt="x", max_new_tokens=2))
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(pb.GenerateRequest(request_id="dup", prompt="x", max_new_tokens=2))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "already in use" in err.value.details()
    )
    rest = [first, *running]
    assert sum(len(c.token_ids) for c in rest) == 40
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_cancel_frees_slot_and_kv_and_unknown_ids_are_not_found(server: RunningServer) -> None:
    stub = server.stub()
    request_id = stub.Submit(
        pb.GenerateRequest(prompt="long", max_new_tokens=1000, ignore_eos=True)
    ).request_id
    stream = stub.Stream(pb.StreamRequest(request_id=request_id))
    next(stream)  # it is running
    assert stub.GetStats(pb.GetStatsRequest()).total.active_sequences >= 1
    assert stub.Cancel(pb.CancelRequest(request_id=request_id)).cancelled
    assert list(stream)[-1].finish_reason == pb.FINISH_REASON_CANCELLED

    def freed() -> bool:
        total = stub.GetStats(pb.GetStatsRequest()).total
        return total.active_sequences == 0 and total.kv_blocks_used == 0

    wait_for(freed, 5, "no active sequence and no KV block in use after the cancel")
    assert not stub.Cancel(pb.CancelRequest(request_id=request_id)).cancelled
    for call in (
        lambda: stub.Cancel(pb.CancelRequest(request_id="nope")),
        lambda: list(stub.Stream(pb.StreamRequest(request_id="nope"))),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_info_stats_and_reflection(server: RunningServer) -> None:
    stub = server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.architecture == "llama" and info.vocab_size == 512 and info.max_context == 2048
    assert list(info.eos_token_ids) == [0] and info.device.startswith("cpu")
    stats = stub.GetStats(pb.GetStatsRequest())
    assert [w.worker for w in stats.workers] == [0, 1] and all(w.alive for w in stats.workers)
    assert stats.total.kv_blocks_total == sum(w.kv_blocks_total for w in stats.workers) > 0
    from grpc_reflection.v1alpha import reflection_pb2

    # Reflection v1 and v1alpha (the messages are the same; tests/test_reflection.py).
    for version in ("v1", "v1alpha"):
        with grpc.insecure_channel(server.target) as channel:
            info = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            reply = next(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"shoal.v1.Inference", "grpc.health.v1.Health"} <= names, version
        assert f"grpc.reflection.{version}.ServerReflection" in names, version


def test_a_stream_deadline_ends_only_that_listener(server: RunningServer) -> None:
    """inference.proto: a Stream's own deadline does not cancel the request; a Cancel ends
    the other listeners with a last chunk (no tokens, FINISH_REASON_CANCELLED, usage)."""
    stub = server.stub()
    long = pb.GenerateRequest(prompt="runs on", max_new_tokens=2000, ignore_eos=True)
    request_id = stub.Submit(long).request_id
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Stream(pb.StreamRequest(request_id=request_id), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    listener = stub.Stream(pb.StreamRequest(request_id=request_id), timeout=30)
    assert next(listener).finish_reason == pb.FINISH_REASON_UNSPECIFIED  # still running
    assert stub.Cancel(pb.CancelRequest(request_id=request_id)).cancelled
    last = list(listener)[-1]
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED
    assert last.usage.completion_tokens == last.index + len(last.token_ids)
    replay = list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=0)))
    assert replay[-1].usage == last.usage
    end = last.usage.completion_tokens
    (tail,) = stub.Stream(pb.StreamRequest(request_id=request_id, from_index=end))
    assert (tail.index, list(tail.token_ids), tail.usage) == (end, [], last.usage)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=end + 1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# The tests below start their own server with `servers`, which stops it at teardown and
# checks that it exits with status 0 and leaves no shared-memory segment behind.


def test_queue_full_and_deadline_while_queued(servers: ServerGroup) -> None:
    flags = ("--workers", "1", "--max-batch-size", "1", "--max-queue-len", "2")
    server = servers.start(*flags, "--batch-timeout-ms", "0")
    stub = server.stub()
    long = pb.GenerateRequest(prompt="busy", max_new_tokens=2000, ignore_eos=True)
    busy = stub.Submit(long).request_id
    next(stub.Stream(pb.StreamRequest(request_id=busy)))  # the only slot is taken
    queued = [stub.Submit(long).request_id for _ in range(2)]
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(long)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2" in err.value.details()
    for request_id in queued:
        assert stub.Cancel(pb.CancelRequest(request_id=request_id)).cancelled
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="late", max_new_tokens=4), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Removed from the front's pending queue at once, long before the busy request could end
    # and free the slot. (total.queue_length counts requests waiting inside the workers: this
    # one never got that far.)
    wait_for(
        lambda: stub.GetStats(pb.GetStatsRequest()).pending_queue_length == 0,
        1,
        "the request whose deadline passed left the pending queue",
    )
    assert stub.GetStats(pb.GetStatsRequest()).total.active_sequences == 1  # still busy
    stub.Cancel(pb.CancelRequest(request_id=busy))


def test_killed_worker_fails_its_requests_and_comes_back(servers: ServerGroup) -> None:
    # --max-resumptions 1: never resumed (tests/test_resume.py covers resumption).
    server = servers.start("--workers", "1", "--max-batch-size", "4", "--max-resumptions", "1")
    stub = server.stub()
    stream = stub.Generate(
        pb.GenerateRequest(prompt="doomed", max_new_tokens=2000, ignore_eos=True), timeout=60
    )
    next(stream)
    worker_pids = [
        int(line.split("pid ")[1].rstrip(")\n"))
        for line in server.log.read_text().splitlines()
        if "worker 0 started" in line
    ]
    os.kill(worker_pids[-1], signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "worker 0 died" in err.value.details()
    wait_for(lambda: server.health() == SERVING, 60, "SERVING again once worker 0 restarted")
    chunks = generate(stub, prompt="after", max_new_tokens=5)
    assert sum(len(c.token_ids) for c in chunks) == 5


def test_sigterm_drains_running_requests_then_exits_cleanly(servers: ServerGroup) -> None:
    server = servers.start("--workers", "1", "--drain-grace-s", "60")
    stub = server.stub()
    request = pb.GenerateRequest(prompt="finish me", max_new_tokens=600, ignore_eos=True)
    stream = stub.Generate(request, timeout=60)
    first = next(stream)
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: server.health() != SERVING, 10, "health left SERVING on SIGTERM")
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(pb.GenerateRequest(prompt="too late", max_new_tokens=2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.process.poll() is None  # still draining: the long request is running
    rest = [first, *stream]
    assert sum(len(c.token_ids) for c in rest) == 600
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.process.wait(timeout=60) == 0
    assert server.segments() == []
