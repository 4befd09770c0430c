"""The client library and CLI without any server: targets and channel options, request
building, protobuf conversion, JSONL parsing, argument parsing. Everything that talks to a
service runs against a real `python -m server` in test_client_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from client import Chunk, ShoalError, build_request
from client.batch import BatchJob, count_failed, parse_lines, result_record, write_records
from client.channel import ROUND_ROBIN_CONFIG, auth_metadata, channel_target
from client.cli import parse_args, request_params
from client.commands import stats_table, summary_line
from client.types import CompletionBuilder, chunk_from_pb, model_info_from_pb, stats_from_pb
from shoal.v1 import inference_pb2 as pb

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


def test_balanced_channels_skip_unhealthy_servers_and_retry_refusals() -> None:
    config = json.loads(ROUND_ROBIN_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}  # grpc.health.v1, whole server
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "shoal.v1.Inference"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 3
    custom = ("grpc.service_config", "{}")  # a caller's own service config wins
    assert channel_target("127.0.0.1:1,127.0.0.1:2", [custom])[1] == [custom]


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
        min_p=0.25,
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
    assert req.min_p == 0.25
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
            usage=pb.Usage(prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=2),
            timing=pb.Timing(queue_ms=1.0, ttft_ms=2.0, total_ms=3.0),
        )
    )
    assert last.finish_reason == "LENGTH" and last.usage and last.usage.completion_tokens == 3
    assert last.usage.cached_prompt_tokens == 2
    assert last.timing and last.timing.total_ms == 3.0
    empty_end = chunk_from_pb(pb.GenerateChunk(finish_reason=pb.FINISH_REASON_CANCELLED))
    assert empty_end.finish_reason == "CANCELLED" and empty_end.usage is None
    builder = CompletionBuilder()
    for chunk in (running, last):
        builder.add(chunk)
    done = builder.build()
    assert (done.text, done.token_ids, done.finish_reason) == ("abc", (5, 6, 7), "LENGTH")
    assert done.usage == last.usage and done.request_id == "r"
    summary = "finish=LENGTH tokens=3 prompt_tokens=4 cached_prompt_tokens=2 ttft_ms=2.0"
    assert summary in summary_line(done)


def test_stats_and_model_info_conversion() -> None:
    w = pb.WorkerStats(worker=0, active_sequences=2, total_tokens=10, utilization=0.25, alive=True)
    w.kv_blocks_cached, w.prefix_cache_hit_rate = 5, 0.375
    w.prefix_cache_query_tokens, w.prefix_cache_hit_tokens = 64, 24
    total = pb.WorkerStats(worker=-1, total_tokens=10)
    stats = stats_from_pb(pb.Stats(workers=[w], total=total, pending_queue_length=7))
    assert stats.workers[0].active_sequences == 2 and stats.total.worker == -1
    assert stats.as_dict()["total"]["total_tokens"] == 10 and stats.pending_queue_length == 7
    row = stats.workers[0]
    assert (row.prefix_cache_query_tokens, row.prefix_cache_hit_tokens) == (64, 24)
    table = stats_table(stats).splitlines()
    assert len(table) == 4 and table[2].split()[0] == "total" and "25.0%" in table[1]
    assert "prefix hit" in table[0] and table[1].split()[-2:] == ["5", "37.5%"]
    assert table[-1].endswith(": 7")
    info = model_info_from_pb(pb.ModelInfo(name="m", eos_token_ids=[2, 3], vocab_size=512))
    assert info.eos_token_ids == (2, 3) and info.as_dict()["vocab_size"] == 512


def test_shoal_error_is_an_rpc_error_with_attributes() -> None:
    err = ShoalError(grpc.StatusCode.NOT_FOUND, "unknown request_id 'x'")
    assert isinstance(err, grpc.RpcError) and err.code is grpc.StatusCode.NOT_FOUND
    assert str(err) == "NOT_FOUND: unknown request_id 'x'" and err.details.startswith("unknown")
    assert ShoalError.from_rpc(err) is err
    assert ShoalError.from_rpc(grpc.RpcError()).code is grpc.StatusCode.UNKNOWN


# --- batch: JSONL parsing and ordering ----------------------------------------------------


def test_batch_lines_become_jobs_or_error_records() -> None:
    lines = [
        json.dumps({"request_id": "a", "prompt": "hi", "max_new_tokens": 3, "priority": "LOW"}),
        "",
        json.dumps({"promptTokenIds": [1, 2], "maxNewTokens": "2", "priority": 1, "seed": "7"}),
        "{not json",
        json.dumps({"prompt": "x", "colour": "blue"}),
        json.dumps({"prompt": "x", "priority": "URGENT"}),
        json.dumps({"request_id": "a", "prompt": "again", "max_new_tokens": 1}),
        json.dumps({"prompt": "x", "max_new_tokens": "many"}),
        json.dumps([1, 2]),
        json.dumps({"request_id": 7, "prompt": "x"}),
        json.dumps({"prompt": "x", "priority": 7}),
        json.dumps({"requestId": "b", "prompt": "x", "priority": "PRIORITY_HIGH"}),
    ]
    items = parse_lines(lines)
    assert len(items) == 11  # the blank line is skipped but still counted
    a, ids, b = items[0], items[1], items[-1]
    assert isinstance(a, BatchJob) and a.request_id == "a" and a.params["priority"] == 3
    assert a.params["max_new_tokens"] == 3 and a.params["prompt"] == "hi"
    assert isinstance(ids, BatchJob) and ids.request_id == "line-3" and ids.line_no == 3
    assert "request_id" not in ids.params  # the server picks a unique id
    assert ids.params["prompt_token_ids"] == [1, 2] and ids.params["seed"] == 7
    assert ids.params["max_new_tokens"] == 2 and "prompt" not in ids.params
    assert isinstance(b, BatchJob) and b.request_id == "b" and b.params["priority"] == 1
    # The job rebuilds exactly the request the line is the proto JSON of.
    assert build_request(**b.params) == json_format.Parse(lines[-1], pb.GenerateRequest())
    errors = {i["request_id"]: i["error"] for i in items if isinstance(i, dict)}
    assert errors["line-4"].startswith("line 4: INVALID_ARGUMENT: ")
    assert errors["line-5"] == "line 5: INVALID_ARGUMENT: unknown field 'colour'"
    assert "priority must be one of PRIORITY_UNSPECIFIED, PRIORITY_HIGH" in errors["line-6"]
    assert errors["a"] == "line 7: INVALID_ARGUMENT: request_id 'a' is used twice"
    assert errors["line-8"] == (
        "line 8: INVALID_ARGUMENT: max_new_tokens must be an integer in [0, 2**32) (got 'many')"
    )
    assert errors["line-9"] == "line 9: INVALID_ARGUMENT: line is not a JSON object"
    assert errors["7"] == "line 10: INVALID_ARGUMENT: request_id must be a string (got 7)"
    assert "priority" in errors["line-11"]  # a number the wire enum does not have


def test_records_are_written_one_json_object_a_line(tmp_path: Path) -> None:
    builder = CompletionBuilder()
    builder.add(Chunk("srv-1", 0, (5, 6), "ca"))
    usage = pb.Usage(prompt_tokens=1, completion_tokens=3, cached_prompt_tokens=0)
    builder.add(
        chunk_from_pb(
            pb.GenerateChunk(
                index=2, token_ids=[7], text="fé", usage=usage, finish_reason=pb.FINISH_REASON_EOS
            )
        )
    )
    records = [
        result_record("line-1", builder.build()),
        {"request_id": "b", "error": "line 2: INVALID_ARGUMENT: max_new_tokens must be > 0"},
    ]
    assert records[0] == {
        "request_id": "line-1",
        "token_ids": [5, 6, 7],
        "text": "café",
        "finish_reason": "FINISH_REASON_EOS",
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "cached_prompt_tokens": 0},
    }
    write_records(tmp_path / "out.jsonl", records)
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert "café" in text  # written as UTF-8, not \u escapes
    assert [json.loads(x) for x in text.splitlines()] == records
    assert count_failed(records) == 1


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
        ["bench", "--rate", "0"],
        ["bench", "--requests", "0"],
        ["bench", "--prompt-len", "9:3"],
        ["bench", "--concurrency", "0"],
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
    args = parse_args(["bench", "--rate", "inf", "--prompt-len", "32", "--output-len", "8:16"])
    assert args.rate == float("inf") and args.concurrency is None
    assert (args.prompt_len.low, args.prompt_len.high, args.output_len.high) == (32, 32, 16)


def test_stop_flags_take_backslash_escapes_and_chat_sends_messages() -> None:
    args = parse_args(["generate", "hi", "--stop", r"\n\n", "--stop", "é\\t", "--chat"])
    params = request_params(args)
    assert params["stop"] == ["\n\n", "é\t"]
    assert params["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in params
    req = build_request(**params)
    assert [(m.role, m.content) for m in req.messages] == [("user", "hi")]
    assert not req.HasField("prompt")
    system = parse_args(["generate", "hi", "--chat", "--system", "Be brief."])
    assert [m["role"] for m in request_params(system)["messages"]] == ["system", "user"]
    assert parse_args(["chat"]).max_new_tokens == 256
