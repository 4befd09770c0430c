"""`python -m worker.batch`: a real subprocess over JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format
from service_harness import run_batch
from tokenizers import Tokenizer

from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import Priority, SamplingParams

LINES = [
    {"request_id": "text", "prompt": "Hello, world", "max_new_tokens": 12, "ignore_eos": True},
    {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 5, "temperature": 0.8, "seed": 3},
    "{not json",
    {"prompt": "x", "prompt_token_ids": [1], "max_new_tokens": 2},
    {"request_id": "zero", "prompt": "x", "max_new_tokens": 0},
    {"prompt": "x", "max_new_tokens": 2, "top_p": 1.5},
    {"prompt_token_ids": [1, 99999], "max_new_tokens": 2},
    {"prompt": "x", "max_new_tokens": 2, "colour": "blue"},
    {"request_id": "high", "prompt": "café 你好", "max_new_tokens": 6, "priority": "HIGH"},
    {"prompt": "x", "max_new_tokens": 2, "priority": "URGENT"},
]


def test_every_line_is_answered_in_order(
    default_model: Path, tmp_path: Path, make_processor, model_tokenizer: Tokenizer
) -> None:
    proc, records = run_batch(default_model, tmp_path, LINES)
    assert proc.returncode == 1, proc.stderr  # some lines were rejected
    assert len(records) == len(LINES)
    ids = [r["request_id"] for r in records]
    assert ids == [
        "text",
        "line-2",
        "line-3",
        "line-4",
        "zero",
        "line-6",
        "line-7",
        "line-8",
        "high",
        "line-10",
    ]
    errors = {r["request_id"]: r["error"] for r in records if "error" in r}
    assert errors["line-3"].startswith("line 3:")
    assert "exactly 1 of prompt, prompt_token_ids or messages" in errors["line-4"]
    assert "max_new_tokens must be in [1, 4096] (got 0: not set, or 0)" in errors["zero"]
    assert "top_p must be in [0, 1]" in errors["line-6"]
    assert "prompt_token_ids[1] = 99999 must be in [0, 512)" in errors["line-7"]
    assert "unknown field 'colour'" in errors["line-8"]
    assert "priority must be one of PRIORITY_UNSPECIFIED, PRIORITY_HIGH" in errors["line-10"]
    assert errors["line-10"].endswith("(or HIGH, NORMAL, LOW) (got 'URGENT')")
    assert "requests" in proc.stderr and "tok/s" in proc.stderr  # the progress bar

    tokenizer = model_tokenizer
    text = records[0]
    assert text["finish_reason"] == "FINISH_REASON_LENGTH" and len(text["token_ids"]) == 12
    assert text["usage"] == {
        "prompt_tokens": len(tokenizer.encode("Hello, world").ids),
        "completion_tokens": 12,
        "cached_prompt_tokens": 0,
    }
    assert text["text"] == tokenizer.decode(text["token_ids"])

    # The same greedy tokens as the in-process engine.
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = run_to_completion(
        make_processor(),
        [Request("t", tokenizer.encode("Hello, world").ids, params, Priority.NORMAL)],
    )
    assert text["token_ids"] == want["t"].token_ids


def test_stop_strings_end_the_request_and_are_not_emitted(
    default_model: Path, tmp_path: Path
) -> None:
    base = {
        "request_id": "base",
        "prompt_token_ids": [3, 4, 5],
        "max_new_tokens": 16,
        "ignore_eos": True,
    }
    _, (full,) = run_batch(default_model, tmp_path, [base])
    stop = full["text"][len(full["text"]) // 2 :][:2]
    assert stop
    _, (cut,) = run_batch(default_model, tmp_path, [{**base, "stop": [stop]}])
    assert cut["finish_reason"] == "FINISH_REASON_STOP"
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert len(cut["token_ids"]) < 16


def test_proto_json_lines_run_and_results_are_proto_json(
    default_model: Path, tmp_path: Path
) -> None:
    """Lines written by json_format.MessageToJson (camelCase, "seed": "7", "PRIORITY_HIGH")
    and examples/prompts.jsonl run; each result line reads back as a GenerateChunk."""
    written = pb.GenerateRequest(
        request_id="from-proto",
        prompt_token_ids=[5, 6, 7],
        max_new_tokens=5,
        temperature=0.8,
        seed=7,
        priority=pb.PRIORITY_HIGH,
        ignore_eos=True,
    )
    line = json_format.MessageToJson(written, indent=None)
    assert '"seed": "7"' in line and '"PRIORITY_HIGH"' in line and "maxNewTokens" in line
    snake = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 5, "temperature": 0.8}
    same = {**snake, "seed": 7, "priority": "HIGH", "ignore_eos": True, "request_id": "short"}
    examples = Path(__file__).resolve().parents[1] / "examples/prompts.jsonl"
    lines = [line, same, *examples.read_text(encoding="utf-8").splitlines()]
    proc, records = run_batch(default_model, tmp_path, lines)
    assert proc.returncode == 0, proc.stderr
    assert [r["request_id"] for r in records[:3]] == ["from-proto", "short", "greeting"]
    assert records[0]["token_ids"] == records[1]["token_ids"]  # the same request, two spellings
    assert len(records[0]["token_ids"]) == 5
    for record in records:
        chunk = json_format.Parse(json.dumps(record), pb.GenerateChunk())
        assert chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert list(chunk.token_ids) == record["token_ids"] and chunk.text == record["text"]
        assert chunk.usage.completion_tokens == len(record["token_ids"])
