"""JSONL requests as proto JSON (server/proto_json.py, and its client twin client/proto_json.py).

A line is what protobuf's json_format reads for a GenerateRequest (and what grpcurl sends):
snake_case or lowerCamelCase names, full enum names or numbers, 64-bit integers as strings,
plus the short priority names as shoal's one extension. Errors name the field. The offline
runner (server side) and `shoal batch` (client side) apply the same rules: the same code, and
the same answer for every line below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

import client.batch
import shoal.proto_json
from server.proto_json import fields_from_proto, finish_reason_name, request_from_json
from server.validation import InvalidRequest
from shoal.v1 import inference_pb2 as pb
from worker.channel.types import FinishReason

REPO = Path(__file__).resolve().parents[1]

FULL = pb.GenerateRequest(
    request_id="r-1",
    prompt="café 你好",
    max_new_tokens=8,
    temperature=0.5,
    top_k=40,
    top_p=0.9,
    min_p=0.05,
    seed=2**64 - 1,
    stop=["\n\n"],
    stop_token_ids=[2, 3],
    ignore_eos=True,
    priority=pb.PRIORITY_HIGH,
)
CHAT = pb.GenerateRequest(
    messages=[pb.ChatMessage(role="system", content=""), pb.ChatMessage(role="user", content="hi")],
    max_new_tokens=4,
    priority=pb.PRIORITY_LOW,
)

# Lines both edges must read alike: accepted (to the same message) or refused (same words).
LINES: list[Any] = [
    {"prompt": "x", "max_new_tokens": 2},
    {"prompt": "x", "maxNewTokens": "2", "seed": "7", "priority": "PRIORITY_HIGH"},
    {"prompt": "x", "priority": "high"},
    {"prompt": "x", "priority": "Low"},
    {"prompt": "x", "priority": 2},
    {"prompt": "x", "priority": 9},  # open enum: read, then refused by validation
    {"prompt": "x", "priority": "URGENT"},
    {"prompt": "x", "priority": "PRIORITY_URGENT"},
    {"messages": [{"role": "user", "content": "hi"}], "maxNewTokens": 1},
    {"messages": [{"role": "user", "text": "hi"}]},
    {"messages": [{"role": "user", "content": 3}]},
    {"messages": {"role": "user"}},
    {"messages": ["hi"]},
    {"prompt": "x", "colour": "blue"},
    {"prompt": "x", "max_new_tokens": 1, "maxNewTokens": 2},
    {"prompt": "x", "max_new_tokens": 2.5},
    {"prompt": "x", "max_new_tokens": -1},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "seed": "18446744073709551616"},
    {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "temperature": "NaN"},
    {"prompt_token_ids": [1, "2", "x"]},
    {"prompt": "x", "stop": "\n"},
    {"prompt": "x", "ignore_eos": "yes"},
    {"prompt": None, "seed": None, "promptTokenIds": [1]},
    {"request_id": 7, "prompt": "x"},
    [1, 2],
    "text",
]


def outcome(parse: Any, line: Any) -> tuple[str, Any]:
    try:
        return "ok", parse(line, pb.GenerateRequest)
    except ValueError as err:
        return "error", str(err)


@pytest.mark.parametrize("line", LINES, ids=[json.dumps(x)[:40] for x in LINES])
def test_offline_and_client_batch_read_lines_alike(line: Any) -> None:
    """worker.batch (server/proto_json.py) and `shoal batch` (client/batch.py) both read a
    line with shoal/proto_json.py: the same result, or the same error naming the field."""
    assert client.batch.parse_message is shoal.proto_json.parse_message
    kind, value = outcome(shoal.proto_json.parse_message, line)
    try:
        assert (kind, request_from_json(json.dumps(line))) == ("ok", value)
    except InvalidRequest as err:
        assert (kind, str(err)) == ("error", value)


@pytest.mark.parametrize("message", [FULL, CHAT, pb.GenerateRequest()])
@pytest.mark.parametrize("proto_names", [False, True])
def test_what_message_to_json_writes_is_read_back(
    message: pb.GenerateRequest, proto_names: bool
) -> None:
    text = json_format.MessageToJson(message, indent=None, preserving_proto_field_name=proto_names)
    assert "\n" not in text  # one JSONL line
    assert request_from_json(text) == message
    if message is FULL:  # the proto JSON forms: a 64-bit string, the full enum name
        obj = json.loads(text)
        assert obj["seed"] == str(2**64 - 1) and obj["priority"] == "PRIORITY_HIGH"
        assert ("max_new_tokens" if proto_names else "maxNewTokens") in obj
        assert fields_from_proto(request_from_json(text)).seed == 2**64 - 1


def test_errors_name_the_field_readably() -> None:
    cases = {
        '{"prompt": "x", "colour": 1}': "unknown field 'colour'",
        '{"messages": [{"role": "u", "text": "x"}]}': "unknown field 'messages[0].text'",
        '{"messages": [{"role": "u", "content": 3}]}': "messages[0].content must be a string",
        '{"prompt_token_ids": [1, "x"]}': "prompt_token_ids[1] must be an integer in [0, 2**32)",
        '{"seed": -1}': "seed must be an integer in [0, 2**64) (got -1)",
        '{"temperature": "hot"}': "temperature must be a number (got 'hot')",
        '{"max_new_tokens": 1, "maxNewTokens": 2}': (
            "max_new_tokens is given twice (as 'max_new_tokens' and 'maxNewTokens')"
        ),
        '{"priority": "URGENT"}': (
            "priority must be one of PRIORITY_UNSPECIFIED, PRIORITY_HIGH, PRIORITY_NORMAL, "
            "PRIORITY_LOW (or HIGH, NORMAL, LOW) (got 'URGENT')"
        ),
        "{oops": "not a JSON object",
        "[1]": "a request must be a JSON object",
    }
    for line, message in cases.items():
        with pytest.raises(InvalidRequest) as info:
            request_from_json(line)
        assert message in str(info.value), (line, str(info.value))
        assert "\n" not in str(info.value) and "Available Fields" not in str(info.value)


def test_short_priority_names_are_an_extension() -> None:
    for name, wire in [("HIGH", 1), ("high", 1), ("Normal", 2), ("low", 3), ("PRIORITY_LOW", 3)]:
        assert request_from_json({"priority": name}).priority == wire, name
    with pytest.raises(json_format.ParseError):  # plain proto JSON does not take them
        json_format.ParseDict({"priority": "HIGH"}, pb.GenerateRequest())


def test_example_prompts_are_plain_proto_json() -> None:
    """examples/prompts.jsonl: what grpcurl -d accepts (no extension needed), and worker.batch."""
    lines = (REPO / "examples/prompts.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines
    for line in lines:
        strict = json_format.Parse(line, pb.GenerateRequest())  # no short names, no unknowns
        assert request_from_json(line) == strict


def test_finish_reasons_are_written_by_their_proto_names() -> None:
    names = {reason: finish_reason_name(reason) for reason in FinishReason}
    assert names[FinishReason.STOP] == "FINISH_REASON_STOP"
    assert all(pb.FinishReason.Value(n) is not None for n in names.values())
