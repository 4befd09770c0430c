"""validate(): every bad field is refused with its name and limit; good requests pass through.

Requests are built as protobuf messages and cross the gRPC edge
(`fields_from_proto`) first, as the server does; the JSON edge (`from_json`)
is checked at the end.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import Tokenizer

from server.servicer import fields_from_proto
from server.validation import (
    InvalidRequest,
    Limits,
    RequestFields,
    ValidatedRequest,
    from_json,
)
from server.validation import validate as validate_fields
from shoal.v1 import inference_pb2 as pb
from worker.channel.types import Priority, SamplingParams

LIMITS = Limits(vocab_size=512, max_context=100, max_new_tokens_limit=50)


@pytest.fixture
def tokenizer(toy_tokenizer: Tokenizer) -> Tokenizer:
    return toy_tokenizer


def validate(request: pb.GenerateRequest, limits: Limits, tokenizer: Any) -> ValidatedRequest:
    """The server's path: the gRPC edge, then validation of plain values."""
    return validate_fields(fields_from_proto(request), limits, tokenizer)


def request(**fields: Any) -> pb.GenerateRequest:
    base: dict[str, Any] = {"prompt_token_ids": [1, 2, 3], "max_new_tokens": 4}
    base.update(fields)
    return pb.GenerateRequest(**base)


def test_valid_request_round_trip(tokenizer: Tokenizer) -> None:
    req = request(
        request_id="r-1",
        max_new_tokens=10,
        temperature=0.5,
        top_k=40,
        top_p=0.75,
        min_p=0.25,
        seed=1234,
        stop=["\n\n", "🙂"],
        stop_token_ids=[0, 7],
        ignore_eos=True,
        priority=pb.PRIORITY_HIGH,
    )
    assert validate(req, LIMITS, tokenizer) == ValidatedRequest(
        request_id="r-1",
        prompt_ids=[1, 2, 3],
        params=SamplingParams(
            max_new_tokens=10,
            temperature=0.5,
            top_k=40,
            top_p=0.75,
            min_p=0.25,
            seed=1234,
            stop_token_ids=(0, 7),
            ignore_eos=True,
        ),
        priority=Priority.HIGH,
        stop=("\n\n", "🙂"),
    )


def test_text_prompt_is_tokenized(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox 🙂 你好"
    req = pb.GenerateRequest(prompt=text, max_new_tokens=1)
    valid = validate(req, LIMITS, tokenizer)
    assert valid.prompt_ids == tokenizer.encode(text).ids
    assert tokenizer.decode(valid.prompt_ids) == text
    assert valid.request_id is None and valid.stop == ()


def test_defaults_and_priority_mapping(tokenizer: Tokenizer) -> None:
    expected = {
        pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
        pb.PRIORITY_NORMAL: Priority.NORMAL,
        pb.PRIORITY_HIGH: Priority.HIGH,
        pb.PRIORITY_LOW: Priority.LOW,
    }
    for wire, priority in expected.items():
        valid = validate(request(priority=wire), LIMITS, tokenizer)
        assert valid.priority == priority
        assert valid.params.greedy and valid.params.top_p == 1.0 and valid.params.top_k == 0


def test_unset_seed_is_drawn_and_top_p_zero_means_off(tokenizer: Tokenizer) -> None:
    seeds = {validate(request(top_p=0.0), LIMITS, tokenizer).params.seed for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2**64 for s in seeds)
    assert validate(request(top_p=0.0), LIMITS, tokenizer).params.top_p == 1.0
    assert validate(request(seed=0), LIMITS, tokenizer).params.seed == 0  # set, even if 0


def test_limits_are_inclusive(tokenizer: Tokenizer) -> None:
    req = request(
        request_id="x" * 128,
        prompt_token_ids=[511] * 50,
        max_new_tokens=50,
        top_k=512,
        top_p=1.0,
        stop=["s" * 256] * 16,
        stop_token_ids=[511] * 64,
    )
    valid = validate(req, LIMITS, tokenizer)
    assert len(valid.prompt_ids) == 50 and len(valid.stop) == 16


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt_token_ids": []}, ["prompt", "prompt_token_ids", "1", "neither"]),
        ({"prompt": "hi"}, ["prompt", "prompt_token_ids", "1", "both"]),
        ({"prompt_token_ids": [], "prompt": ""}, ["prompt", "1 character"]),
        ({"prompt_token_ids": [5, 512]}, ["prompt_token_ids[1]", "512"]),
        ({"prompt_token_ids": [1] * 60, "max_new_tokens": 41}, ["prompt", "max_new_tokens", "100"]),
        ({"prompt_token_ids": [1] * 101, "max_new_tokens": 1}, ["prompt", "101", "100"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", "[1, 50]"]),
        ({"max_new_tokens": 51}, ["max_new_tokens", "[1, 50]", "51"]),
        ({"temperature": -0.5}, ["temperature", ">= 0"]),
        ({"temperature": float("nan")}, ["temperature", ">= 0", "nan"]),
        ({"temperature": float("inf")}, ["temperature", "finite"]),
        ({"top_p": 1.5}, ["top_p", "[0, 1]"]),
        ({"top_p": -0.1}, ["top_p", "[0, 1]"]),
        ({"top_p": float("nan")}, ["top_p", "[0, 1]"]),
        ({"min_p": 1.5}, ["min_p", "[0, 1]"]),
        ({"min_p": float("nan")}, ["min_p", "[0, 1]"]),
        ({"top_k": 513}, ["top_k", "512"]),
        ({"stop": ["a"] * 17}, ["stop", "17", "16"]),
        ({"stop": ["ok", "s" * 257]}, ["stop[1]", "257", "256"]),
        ({"stop": ["ok", ""]}, ["stop[1]", "1 to 256"]),
        ({"stop_token_ids": [1] * 65}, ["stop_token_ids", "65", "64"]),
        ({"stop_token_ids": [3, 600]}, ["stop_token_ids[1]", "600", "[0, 512)"]),
        ({"priority": 4}, ["priority", "4", "[0, 3]"]),
        ({"priority": -1}, ["priority", "-1", "[0, 3]"]),
        ({"request_id": "x" * 129}, ["request_id", "129", "128"]),
        ({"request_id": "é" * 65}, ["request_id", "130 bytes", "128"]),
    ],
)
def test_invalid_requests_name_field_and_limit(
    tokenizer: Tokenizer, fields: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(request(**fields), LIMITS, tokenizer)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_prompt_that_tokenizes_to_nothing() -> None:
    class NoTokens:
        def encode(self, sequence: str) -> SimpleNamespace:
            return SimpleNamespace(ids=[])

    req = pb.GenerateRequest(prompt="hello", max_new_tokens=1)
    with pytest.raises(InvalidRequest, match=r"prompt must give at least 1 token"):
        validate(req, LIMITS, NoTokens())


def test_text_prompt_over_the_context(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    req = pb.GenerateRequest(prompt=text, max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="context of 100 tokens"):
        validate(req, LIMITS, tokenizer)


def test_json_edge_checks_types_and_names_unknown_fields(tokenizer: Tokenizer) -> None:
    line = {"prompt": "hi", "max_new_tokens": 3, "min_p": 0.1, "priority": "high", "seed": 5}
    valid = validate_fields(from_json(line), LIMITS, tokenizer)
    assert valid.priority == Priority.HIGH and valid.params.min_p == 0.1
    assert valid.params.seed == 5 and valid.prompt_ids == tokenizer.encode("hi").ids
    assert from_json({}) == RequestFields()
    bad = [
        ([1], "a JSON object"),
        ({"colour": "blue"}, "unknown field 'colour'"),
        ({"max_new_tokens": "3"}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids must be a list of integers"),
        ({"stop": "x"}, "stop must be a list of strings"),
        ({"ignore_eos": 1}, "ignore_eos must be true or false"),
    ]
    for obj, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            from_json(obj)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"priority": "URGENT"}, ["priority", "HIGH, NORMAL or LOW", "URGENT"]),
        ({"max_new_tokens": -1}, ["max_new_tokens", "[1, 50]"]),
        ({"top_k": -1}, ["top_k", "[0, 512]"]),
        ({"seed": -1}, ["seed", "2**64"]),
        ({"seed": 2**64}, ["seed", "2**64"]),
        ({"prompt_token_ids": [1, -2]}, ["prompt_token_ids[1]", "-2", "[0, 512)"]),
        ({"stop_token_ids": [-1]}, ["stop_token_ids[0]", "[0, 512)"]),
    ],
)
def test_values_only_json_can_carry_are_refused(
    tokenizer: Tokenizer, fields: dict[str, Any], words: list[str]
) -> None:
    base = {"prompt_token_ids": [1, 2, 3], "max_new_tokens": 4}
    with pytest.raises(InvalidRequest) as info:
        validate_fields(from_json({**base, **fields}), LIMITS, tokenizer)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
