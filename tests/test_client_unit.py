"""The client library and CLI without a shoal server: pure helpers, plus the real client
code paths against a tiny in-process fake of the Inference service."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import AsyncShoalClient, Chunk, ShoalClient, ShoalError, build_request
from client.batch import BatchJob, parse_lines, run_batch, write_records
from client.channel import ROUND_ROBIN_CONFIG, auth_metadata, channel_target
from client.cli import build_parser, parse_args, request_params
from client.commands import main, stats_table, summary_line
from client.types import CompletionBuilder, chunk_from_pb, model_info_from_pb, stats_from_pb
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

RR = ("grpc.service_config", ROUND_ROBIN_CONFIG)


# --- targets and channel options -------------------------------------------------------------


def test_single_target_uses_grpc_defaults() -> None:
    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", [])
    assert channel_target(["shoal:50051"]) == ("shoal:50051", [])


def test_several_targets_become_a_round_robin_address_list() -> None:
    expected = ("ipv4:127.0.0.1:5001,127.0.0.1:5002", [RR])
    assert channel_target("127.0.0.1:5001,127.0.0.1:5002") == expected
    assert channel_target(["127.0.0.1:5001", "127.0.0.1:5002"]) == expected
    assert channel_target(["localhost:5001", " 127.0.0.1:5002 "])[0].startswith("ipv4:127.")
    assert channel_target(["[::1]:1", "::1:2"])[0] == "ipv6:[::1]:1,[::1]:2"


def test_dns_target_gets_round_robin_and_options_are_kept() -> None:
    target, options = channel_target("dns:///shoal:50051", [("grpc.max_receive_message_length", 9)])
    assert target == "dns:///shoal:50051"
    assert options == [("grpc.max_receive_message_length", 9), RR]


@pytest.mark.parametrize(
    "bad", ["", " , ", ["127.0.0.1", "127.0.0.1:1"], ["1.2.3.4:1", "::1:2"], ["a:1", "dns:b:2"]]
)
def test_bad_targets_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError):
        channel_target(bad)


def test_auth_metadata() -> None:
    assert auth_metadata("s3cret") == (("authorization", "Bearer s3cret"),)
    assert auth_metadata(None) == auth_metadata("") == ()


# --- requests ----------------------------------------------------------------------------


def test_request_fields_from_kwargs() -> None:
    req = build_request(
        "hi",
        max_new_tokens=5,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        seed=0,
        stop="\n",
        stop_token_ids=[2],
        ignore_eos=True,
        priority="high",
        request_id="r1",
    )
    assert req.prompt == "hi" and req.HasField("prompt") and not req.prompt_token_ids
    assert (req.max_new_tokens, req.top_k, req.request_id) == (5, 3, "r1")
    assert req.temperature == pytest.approx(0.5) and req.top_p == pytest.approx(0.9)
    assert req.HasField("seed") and req.seed == 0  # seed 0 is sent, not dropped
    assert list(req.stop) == ["\n"] and list(req.stop_token_ids) == [2] and req.ignore_eos
    assert req.priority == pb.PRIORITY_HIGH


def test_prompt_token_ids_and_unset_optionals() -> None:
    req = build_request(prompt_token_ids=(1, 2, 3))
    assert list(req.prompt_token_ids) == [1, 2, 3] and not req.HasField("prompt")
    assert not req.HasField("seed") and req.max_new_tokens == 64
    assert req.priority == pb.PRIORITY_UNSPECIFIED
    assert build_request("").HasField("prompt")  # empty but present: the server rejects it


@pytest.mark.parametrize(
    ("value", "wire"),
    [("LOW", 3), ("normal", 2), ("PRIORITY_HIGH", 1), (pb.PRIORITY_LOW, 3), (None, 0), (0, 0)],
)
def test_priority_names_and_numbers(value: Any, wire: int) -> None:
    assert build_request("x", priority=value).priority == wire


@pytest.mark.parametrize("value", ["URGENT", 7, True, 1.0])
def test_unknown_priority_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="priority must be one of HIGH, NORMAL, LOW"):
        build_request("x", priority=value)


# --- protobuf -> dataclasses -------------------------------------------------------------


def test_running_and_final_chunks() -> None:
    running = chunk_from_pb(pb.GenerateChunk(request_id="r", index=0, token_ids=[5, 6], text="ab"))
    assert running == Chunk("r", 0, (5, 6), "ab", None, None, None)
    last = chunk_from_pb(
        pb.GenerateChunk(
            request_id="r",
            index=2,
            token_ids=[7],
            text="c",
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
            timing=pb.Timing(queue_ms=1.0, ttft_ms=2.0, total_ms=3.0),
        )
    )
    assert last.finish_reason == "LENGTH" and last.usage and last.usage.completion_tokens == 3
    assert last.timing and last.timing.total_ms == 3.0
    empty_end = chunk_from_pb(pb.GenerateChunk(finish_reason=pb.FINISH_REASON_CANCELLED))
    assert empty_end.finish_reason == "CANCELLED" and empty_end.usage is None
    builder = CompletionBuilder()
    for chunk in (running, last):
        builder.add(chunk)
    done = builder.build()
    assert (done.text, done.token_ids, done.finish_reason) == ("abc", (5, 6, 7), "LENGTH")
    assert done.usage == last.usage and done.request_id == "r"
    assert "finish=LENGTH tokens=3 prompt_tokens=4 ttft_ms=2.0" in summary_line(done)


def test_stats_and_model_info_conversion() -> None:
    w = pb.WorkerStats(worker=0, active_sequences=2, total_tokens=10, utilization=0.25, alive=True)
    stats = stats_from_pb(pb.Stats(workers=[w], total=pb.WorkerStats(worker=-1, total_tokens=10)))
    assert stats.workers[0].active_sequences == 2 and stats.total.worker == -1
    assert stats.as_dict()["total"]["total_tokens"] == 10
    table = stats_table(stats).splitlines()
    assert len(table) == 3 and table[-1].split()[0] == "total" and "25.0%" in table[1]
    info = model_info_from_pb(pb.ModelInfo(name="m", eos_token_ids=[2, 3], vocab_size=512))
    assert info.eos_token_ids == (2, 3) and info.as_dict()["vocab_size"] == 512


def test_shoal_error_is_an_rpc_error_with_attributes() -> None:
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "unknown request_id 'x'"

    err = ShoalError.from_rpc(Failed())
    assert isinstance(err, grpc.RpcError) and err.code is grpc.StatusCode.NOT_FOUND
    assert str(err) == "NOT_FOUND: unknown request_id 'x'"
    assert ShoalError.from_rpc(grpc.RpcError()).code is grpc.StatusCode.UNKNOWN


# --- batch: JSONL parsing and ordering ----------------------------------------------------


def test_batch_lines_become_jobs_or_error_records() -> None:
    lines = [
        json.dumps({"request_id": "a", "prompt": "hi", "max_new_tokens": 3, "priority": "LOW"}),
        "",
        json.dumps({"prompt_token_ids": [1, 2], "max_new_tokens": 2, "priority": 1}),
        "{not json",
        json.dumps({"prompt": "x", "colour": "blue"}),
        json.dumps({"prompt": "x", "priority": "URGENT"}),
        json.dumps({"request_id": "a", "prompt": "again", "max_new_tokens": 1}),
        json.dumps({"prompt": "x", "max_new_tokens": "many"}),
        json.dumps([1, 2]),
        json.dumps({"request_id": 7, "prompt": "x"}),
    ]
    items = parse_lines(lines)
    assert len(items) == 9  # the blank line is skipped but still counted
    a, ids = items[0], items[1]
    assert isinstance(a, BatchJob) and a.request_id == "a" and a.params["priority"] == "LOW"
    assert isinstance(ids, BatchJob) and ids.request_id == "line-3" and ids.line_no == 3
    assert "request_id" not in ids.params  # the server picks a unique id
    errors = {i["request_id"]: i["error"] for i in items if isinstance(i, dict)}
    assert errors["line-4"].startswith("line 4: INVALID_ARGUMENT: ")
    assert errors["line-5"] == "line 5: INVALID_ARGUMENT: unknown field 'colour'"
    assert "priority must be one of HIGH, NORMAL, LOW" in errors["line-6"]
    assert errors["a"] == "line 7: INVALID_ARGUMENT: request_id 'a' is used twice"
    assert errors["line-8"].startswith("line 8: INVALID_ARGUMENT:")
    assert errors["line-9"] == "line 9: INVALID_ARGUMENT: line is not a JSON object"
    last = items[-1]  # a numeric id is kept as text; a missing max_new_tokens is sent as 0
    assert isinstance(last, BatchJob) and last.request_id == "7"
    assert last.params["max_new_tokens"] == 0


class FakeAsyncClient:
    """Answers in random order; fails prompts starting with "bad"; tracks concurrency."""

    def __init__(self) -> None:
        self.in_flight = self.peak = 0

    async def generate(self, prompt: str | None = None, **params: Any) -> AsyncIterator[Chunk]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(random.random() / 200)
            if prompt and prompt.startswith("bad"):
                raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
            n = params["max_new_tokens"]
            yield Chunk("srv", 0, tuple(range(n)), prompt or "", None)
            await asyncio.sleep(random.random() / 200)
            usage = pb.Usage(prompt_tokens=1, completion_tokens=n)
            yield chunk_from_pb(pb.GenerateChunk(finish_reason=1, text="!", usage=usage))
        finally:
            self.in_flight -= 1


def test_batch_runs_concurrently_and_answers_in_input_order(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": f"p{i}", "max_new_tokens": i % 4 + 1}) for i in range(40)]
    lines[5] = json.dumps({"prompt": "bad", "max_new_tokens": 1})
    lines[9] = "{oops"
    fake = FakeAsyncClient()
    records = asyncio.run(run_batch(fake, parse_lines(lines), concurrency=6))
    assert [r["request_id"] for r in records] == [f"line-{i + 1}" for i in range(40)]
    assert 1 < fake.peak <= 6
    assert records[5] == {
        "request_id": "line-6",
        "error": "line 6: INVALID_ARGUMENT: max_new_tokens must be > 0",
    }
    assert records[9]["error"].startswith("line 10: INVALID_ARGUMENT:")
    assert records[7] == {
        "request_id": "line-8",
        "token_ids": [0, 1, 2, 3],
        "text": "p7!",
        "finish_reason": "LENGTH",
        "usage": {"prompt_tokens": 1, "completion_tokens": 4},
    }
    write_records(tmp_path / "out.jsonl", records)
    back = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert back == records


# --- CLI arguments --------------------------------------------------------------------------


def test_targets_from_flags_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_TARGET", raising=False)
    assert parse_args(["stats"]).target == ["127.0.0.1:50051"]
    monkeypatch.setenv("SHOAL_TARGET", "10.0.0.1:1,10.0.0.2:2")
    assert parse_args(["info"]).target == ["10.0.0.1:1", "10.0.0.2:2"]
    args = parse_args(["--target", "a:1,b:2", "--target", "c:3", "stats", "--json"])
    assert args.target == ["a:1", "b:2", "c:3"] and args.json
    args = parse_args(["cancel", "r1", "--target", "h:9", "--auth-token", "t", "--timeout", "2"])
    assert (args.target, args.auth_token, args.timeout, args.request_id) == (
        ["h:9"],
        "t",
        2.0,
        "r1",
    )


def test_generate_flags_map_onto_request_kwargs() -> None:
    args = parse_args(
        [
            "generate",
            "--stream",
            "--token-ids",
            "1, 2,3",
            "--max-new-tokens",
            "8",
            "--stop",
            "a",
            "--stop",
            "b",
            "--priority",
            "low",
            "--seed",
            "4",
            "--ignore-eos",
            "--top-p",
            "0.5",
        ]
    )
    params = request_params(args)
    assert args.stream and params["prompt"] is None and params["prompt_token_ids"] == [1, 2, 3]
    assert params["stop"] == ["a", "b"] and params["priority"] == "LOW"
    req = build_request(**params)
    assert (req.max_new_tokens, req.seed, req.priority, req.ignore_eos) == (8, 4, 3, True)
    assert build_request(**request_params(parse_args(["submit", "hi"]))).max_new_tokens == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["generate"],
        ["generate", "hi", "--token-ids", "1"],
        ["generate", "hi", "--priority", "URGENT"],
        ["submit", "--token-ids", "1,x"],
        ["batch", "--input", "a", "--output", "b", "--concurrency", "0"],
        ["bench"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_stream_and_batch_arguments() -> None:
    args = parse_args(["stream", "r9", "--from-index", "3"])
    assert (args.request_id, args.from_index) == ("r9", 3)
    args = parse_args(["batch", "--input", "in.jsonl", "--output", "out.jsonl"])
    assert args.input == Path("in.jsonl") and args.concurrency == 16
    assert "bench" not in build_parser().format_help()


# --- the real client code paths against a fake in-process service ---------------------------


class FakeInference(pb_grpc.InferenceServicer):
    """Generates token i as text "t<i> "; remembers the metadata it saw."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.metadata: list[dict[str, str]] = []

    def _chunks(self, request_id: str, n: int, start: int = 0) -> Iterator[pb.GenerateChunk]:
        for i in range(start, n):
            yield pb.GenerateChunk(request_id=request_id, index=i, token_ids=[i], text=f"t{i} ")
        yield pb.GenerateChunk(
            request_id=request_id,
            index=n,
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=2, completion_tokens=n),
            timing=pb.Timing(queue_ms=0.5, ttft_ms=1.5, total_ms=4.0),
        )

    def Generate(self, request: pb.GenerateRequest, context: Any) -> Iterator[pb.GenerateChunk]:
        self.metadata.append(dict(context.invocation_metadata()))
        if request.max_new_tokens == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        yield from self._chunks(request.request_id or "gen-1", request.max_new_tokens)

    def Submit(self, request: pb.GenerateRequest, context: Any) -> pb.SubmitResponse:
        return pb.SubmitResponse(request_id=request.request_id or self.name)

    def Stream(self, request: pb.StreamRequest, context: Any) -> Iterator[pb.GenerateChunk]:
        if request.request_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown request_id 'missing'")
        yield from self._chunks(request.request_id, 4, request.from_index)

    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=request.request_id == "running")

    def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        return pb.Stats(workers=[pb.WorkerStats(worker=0, alive=True)], total=pb.WorkerStats())

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return pb.ModelInfo(name="tiny", architecture="llama", eos_token_ids=[2])


@pytest.fixture
def fake_servers() -> Iterator[list[tuple[str, FakeInference]]]:
    """Two fake services on 127.0.0.1, each on its own port."""
    servers, out = [], []
    for name in ("a", "b"):
        servicer = FakeInference(name)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        out.append((f"127.0.0.1:{port}", servicer))
    yield out
    for server in servers:
        server.stop(None)


def test_sync_client_calls(fake_servers: list[tuple[str, FakeInference]]) -> None:
    target, servicer = fake_servers[0]
    with ShoalClient(target, auth_token="tok", timeout=10) as shoal:
        chunks = list(shoal.generate("hi", max_new_tokens=3))
        assert [c.text for c in chunks] == ["t0 ", "t1 ", "t2 ", ""]
        assert chunks[-1].finish_reason == "LENGTH" and chunks[0].finish_reason is None
        assert servicer.metadata[-1]["authorization"] == "Bearer tok"
        done = shoal.generate_text(prompt_token_ids=[1], max_new_tokens=2, request_id="r")
        assert (done.request_id, done.text, done.token_ids) == ("r", "t0 t1 ", (0, 1))
        assert done.usage and done.usage.completion_tokens == 2
        assert shoal.submit("hi") == "a" and shoal.submit("hi", request_id="mine") == "mine"
        assert [c.index for c in shoal.stream("r2", from_index=2)] == [2, 3, 4]
        assert shoal.cancel("running") and not shoal.cancel("done")
        assert shoal.stats().workers[0].alive and shoal.model_info().eos_token_ids == (2,)
        with pytest.raises(ShoalError) as err:
            list(shoal.stream("missing"))
        assert err.value.code is grpc.StatusCode.NOT_FOUND and "missing" in err.value.details
        with pytest.raises(grpc.RpcError):  # ShoalError is still a grpc.RpcError
            shoal.generate_text("hi", max_new_tokens=0)


def test_several_targets_spread_calls_round_robin(
    fake_servers: list[tuple[str, FakeInference]],
) -> None:
    with ShoalClient([t for t, _ in fake_servers], timeout=10) as shoal:
        shoal.wait_ready(10)
        seen = {shoal.submit("x") for _ in range(50)}
    assert seen == {"a", "b"}


def test_async_client_and_batch_command(
    fake_servers: list[tuple[str, FakeInference]], tmp_path: Path, capsys: Any
) -> None:
    target = fake_servers[0][0]

    async def calls() -> None:
        async with AsyncShoalClient(target, timeout=10) as shoal:
            await shoal.wait_ready(10)
            done = await shoal.generate_text("hi", max_new_tokens=2)
            assert done.text == "t0 t1 " and done.finish_reason == "LENGTH"
            assert await shoal.submit("x") == "a" and await shoal.cancel("running")
            assert [c.index async for c in shoal.stream("r", 3)] == [3, 4]
            assert (await shoal.model_info()).name == "tiny"
            with pytest.raises(ShoalError) as err:
                await shoal.generate_text("hi", max_new_tokens=0)
            assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(calls())
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"request_id": "x", "prompt": "a", "max_new_tokens": 2}, {"prompt": "b"}]
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = ["--target", target, "batch", "--input", str(src), "--output", str(out)]
    assert main(argv) == 1  # the second line has no max_new_tokens
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0]["text"] == "t0 t1 " and records[0]["usage"]["completion_tokens"] == 2
    assert records[1] == {
        "request_id": "line-2",
        "error": "line 2: INVALID_ARGUMENT: max_new_tokens must be > 0",
    }
    assert "1 failed" in capsys.readouterr().err


def test_cli_commands(fake_servers: list[tuple[str, FakeInference]], capsys: Any) -> None:
    target = fake_servers[0][0]
    assert main(["generate", "hi", "--stream", "--max-new-tokens", "3", "--target", target]) == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 t2 \n" and "finish=LENGTH tokens=3" in err and "ttft_ms=1.5" in err
    assert main(["--target", target, "submit", "--token-ids", "1,2"]) == 0
    assert capsys.readouterr().out == "a\n"
    assert main(["--target", target, "stats"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "total"
    assert main(["--target", target, "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "llama"
    assert main(["--target", target, "stream", "missing"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown request_id 'missing'\n"
