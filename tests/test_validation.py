"""validate(): every bad field is refused with its name and limit; good requests pass through.

Requests are built as protobuf messages and cross the gRPC edge
(`fields_from_proto`) first, as the server does; the JSON edge
(`fields_from_json`: proto JSON, server/proto_json.py; more in
tests/test_proto_json.py) is checked at the end.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from tokenizers import Tokenizer

from server.chat import ChatTemplate, ChatTemplateError
from server.prompts import PromptEncoder
from server.proto_json import fields_from_json
from server.servicer import fields_from_proto
from server.validation import (
    InvalidRequest,
    Limits,
    RequestFields,
    ValidatedRequest,
)
from server.validation import validate as validate_fields
from shoal.v1 import inference_pb2 as pb
from worker.channel.messages import Ready
from worker.channel.types import Priority, SamplingParams

LIMITS = Limits(vocab_size=512, max_context=100, max_new_tokens_limit=50)


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def tokenizer(toy_tokenizer: Tokenizer) -> PromptEncoder:
    """The toy tokenizer with a small chat template, as the front builds it from Ready."""
    return PromptEncoder(toy_tokenizer, ChatTemplate(TEMPLATE, "<s>", "</s>"))


def validate(request: pb.GenerateRequest, limits: Limits, prompts: Any) -> ValidatedRequest:
    """The server's path: the gRPC edge, then validation of plain values."""
    return validate_fields(fields_from_proto(request), limits, prompts)


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
        repetition_penalty=1.25,
        frequency_penalty=-0.5,
        presence_penalty=2.0,
        logprobs=True,
        top_logprobs=20,
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
            repetition_penalty=1.25,
            frequency_penalty=-0.5,
            presence_penalty=2.0,
            logprobs=True,
            top_logprobs=20,
        ),
        priority=Priority.HIGH,
        stop=("\n\n", "🙂"),
    )


def test_text_prompt_is_tokenized(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox 🙂 你好"
    req = pb.GenerateRequest(prompt=text, max_new_tokens=1)
    valid = validate(req, LIMITS, tokenizer)
    assert valid.prompt_ids == tokenizer.tokenizer.encode(text).ids
    assert tokenizer.tokenizer.decode(valid.prompt_ids) == text
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


def test_penalties_off_values_and_logprobs_defaults(tokenizer: Tokenizer) -> None:
    """repetition_penalty 0 (unset) and 1 are both off (1.0 to the engine); logprobs off."""
    for value in (0.0, 1.0):
        params = validate(request(repetition_penalty=value), LIMITS, tokenizer).params
        assert params.repetition_penalty == 1.0 and not params.penalized
    params = validate(request(), LIMITS, tokenizer).params
    assert (params.frequency_penalty, params.presence_penalty) == (0.0, 0.0)
    assert not params.logprobs and params.top_logprobs == 0
    params = validate(request(logprobs=True), LIMITS, tokenizer).params
    assert params.logprobs and params.top_logprobs == 0  # the sampled token's only


def test_top_logprobs_past_a_tiny_vocab(tokenizer: Tokenizer) -> None:
    tiny = Limits(vocab_size=12, max_context=100, max_new_tokens_limit=50)
    req = request(prompt_token_ids=[1], logprobs=True, top_logprobs=13)
    with pytest.raises(InvalidRequest, match=r"top_logprobs must be in \[0, 12\] \(got 13\)"):
        validate(req, tiny, tokenizer)
    req = request(prompt_token_ids=[1], logprobs=True, top_logprobs=12)
    assert validate(req, tiny, tokenizer).params.top_logprobs == 12


def test_limits_are_inclusive(tokenizer: Tokenizer) -> None:
    req = request(
        request_id="x" * 128,
        prompt_token_ids=[511] * 50,
        max_new_tokens=50,
        top_k=512,
        top_p=1.0,
        stop=["s" * 256] * 16,
        stop_token_ids=[511] * 64,
        repetition_penalty=100.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        logprobs=True,
        top_logprobs=20,
    )
    valid = validate(req, LIMITS, tokenizer)
    assert len(valid.prompt_ids) == 50 and len(valid.stop) == 16
    assert valid.params.repetition_penalty == 100.0 and valid.params.top_logprobs == 20
    low = validate(request(repetition_penalty=0.01, frequency_penalty=2.0), LIMITS, tokenizer)
    assert low.params.repetition_penalty == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt_token_ids": []}, ["prompt, prompt_token_ids or messages", "(got none)"]),
        ({"prompt": "hi"}, ["exactly 1", "(got prompt and prompt_token_ids)"]),
        (
            {"messages": [pb.ChatMessage(role="user", content="hi")]},
            ["exactly 1", "(got prompt_token_ids and messages)"],
        ),
        ({"prompt_token_ids": [], "prompt": ""}, ["prompt", "1 character"]),
        ({"prompt_token_ids": [5, 512]}, ["prompt_token_ids[1]", "512"]),
        ({"prompt_token_ids": [1] * 60, "max_new_tokens": 41}, ["prompt", "max_new_tokens", "100"]),
        ({"prompt_token_ids": [1] * 101, "max_new_tokens": 1}, ["prompt", "101", "100"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", "[1, 50]", "(got 0: not set, or 0)"]),
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
        ({"repetition_penalty": -1.0}, ["repetition_penalty", "0 (off)", "[0.01, 100]", "-1"]),
        ({"repetition_penalty": 0.005}, ["repetition_penalty", "[0.01, 100]", "0.005"]),
        ({"repetition_penalty": 100.5}, ["repetition_penalty", "[0.01, 100]", "100.5"]),
        ({"repetition_penalty": float("inf")}, ["repetition_penalty", "[0.01, 100]", "inf"]),
        ({"repetition_penalty": float("nan")}, ["repetition_penalty", "[0.01, 100]", "nan"]),
        ({"frequency_penalty": 2.5}, ["frequency_penalty", "[-2, 2]", "2.5"]),
        ({"frequency_penalty": float("nan")}, ["frequency_penalty", "[-2, 2]", "nan"]),
        ({"presence_penalty": -2.5}, ["presence_penalty", "[-2, 2]", "-2.5"]),
        ({"presence_penalty": float("-inf")}, ["presence_penalty", "[-2, 2]", "-inf"]),
        ({"logprobs": True, "top_logprobs": 21}, ["top_logprobs", "[0, 20]", "21"]),
        ({"top_logprobs": 3}, ["top_logprobs", "needs logprobs", "true"]),
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
        def encode_text(self, text: str) -> list[int]:
            return []

        def encode_chat(self, messages: Any) -> list[int]:
            return []

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
    valid = validate_fields(fields_from_json(line), LIMITS, tokenizer)
    assert valid.priority == Priority.HIGH and valid.params.min_p == pytest.approx(0.1)
    assert valid.params.seed == 5 and valid.prompt_ids == tokenizer.encode_text("hi")
    assert fields_from_json({}) == fields_from_proto(pb.GenerateRequest())
    assert fields_from_json({"max_new_tokens": "3"}).max_new_tokens == 3  # proto JSON allows it
    bad = [
        ([1], "a JSON object"),
        ({"colour": "blue"}, "unknown field 'colour'"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer in \[0, 2\*\*32\)"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"prompt_token_ids": [1, "two"]}, r"prompt_token_ids\[1\] must be an integer"),
        ({"stop": "x"}, "stop must be a list of strings"),
        ({"ignore_eos": 1}, "ignore_eos must be true or false"),
    ]
    for obj, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            fields_from_json(obj)


def test_json_edge_carries_logprobs_and_penalties(tokenizer: Tokenizer) -> None:
    line = {
        "prompt": "hi",
        "max_new_tokens": 3,
        "logprobs": True,
        "topLogprobs": 2,  # proto JSON: lowerCamelCase too
        "repetition_penalty": 1.5,
        "frequencyPenalty": 0.5,
        "presence_penalty": -1,
    }
    params = validate_fields(fields_from_json(line), LIMITS, tokenizer).params
    assert params.logprobs and params.top_logprobs == 2
    assert (params.repetition_penalty, params.frequency_penalty) == (1.5, 0.5)
    assert params.presence_penalty == -1.0
    for bad, words in (
        ({"topLogprobs": 21}, "top_logprobs must be in [0, 20]"),
        ({"logprobs": False}, "top_logprobs (2) needs logprobs"),
        ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
    ):
        with pytest.raises(InvalidRequest) as info:
            validate_fields(fields_from_json({**line, **bad}), LIMITS, tokenizer)
        assert words in str(info.value)
    with pytest.raises(InvalidRequest, match="logprobs must be true or false"):
        fields_from_json({**line, "logprobs": 1})


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"priority": "URGENT"}, ["priority", "PRIORITY_HIGH", "HIGH, NORMAL, LOW", "URGENT"]),
        ({"max_new_tokens": -1}, ["max_new_tokens", "[0, 2**32)", "-1"]),
        ({"top_k": -1}, ["top_k", "[0, 2**32)"]),
        ({"seed": -1}, ["seed", "2**64"]),
        ({"seed": 2**64}, ["seed", "2**64"]),
        ({"seed": str(2**64)}, ["seed", "2**64"]),
        ({"prompt_token_ids": [1, -2]}, ["prompt_token_ids[1]", "-2", "[0, 2**32)"]),
        ({"stop_token_ids": [-1]}, ["stop_token_ids[0]", "[0, 2**32)"]),
        ({"top_logprobs": -1}, ["top_logprobs", "[0, 2**32)", "-1"]),
    ],
)
def test_values_the_proto_cannot_carry_are_refused_by_the_json_edge(
    fields: dict[str, Any], words: list[str]
) -> None:
    base = {"prompt_token_ids": [1, 2, 3], "max_new_tokens": 4}
    with pytest.raises(InvalidRequest) as info:
        fields_from_json({**base, **fields})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_messages_are_rendered_with_the_chat_template(tokenizer: PromptEncoder) -> None:
    turns = [
        pb.ChatMessage(role="system", content="Be brief."),
        pb.ChatMessage(role="user", content="¿Dónde? 你好"),
    ]
    valid = validate(pb.GenerateRequest(messages=turns, max_new_tokens=4), LIMITS, tokenizer)
    rendered = "<system>Be brief.</s>\n<user>¿Dónde? 你好</s>\n<assistant>"
    assert valid.prompt_ids == tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids
    line = {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2}
    from_jsonl = validate_fields(fields_from_json(line), LIMITS, tokenizer)
    assert tokenizer.tokenizer.decode(from_jsonl.prompt_ids) == "<user>hi</s>\n<assistant>"


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "", "content": "x"}], ["messages[0].role", "non-empty"]),
        ([{"role": "user"}], ["messages[0].content", "string"]),
        ([{"role": "user", "content": 3}], ["messages[0].content", "string", "3"]),
        ([{"role": "user", "content": "x"}] * 1025, ["messages", "1025", "1024"]),
        ([{"role": "tool", "content": "x"}], ["messages", "refused", "no tools here"]),
    ],
)
def test_bad_messages_name_the_field(
    tokenizer: PromptEncoder, messages: list[dict], words: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_fields(RequestFields(messages=messages, max_new_tokens=2), LIMITS, tokenizer)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_model_without_a_template_refuses_messages(toy_tokenizer: Tokenizer) -> None:
    request = RequestFields(messages=[{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(InvalidRequest, match="messages: this model has no chat template"):
        validate_fields(request, LIMITS, PromptEncoder(toy_tokenizer))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_empty_message_fields_cross_the_grpc_edge(tokenizer: PromptEncoder) -> None:
    turns = [
        pb.ChatMessage(role="user", content="hi"),
        pb.ChatMessage(role="assistant", content=""),  # an empty answer is still a turn
        pb.ChatMessage(role="user", content="again"),
    ]
    valid = validate(pb.GenerateRequest(messages=turns, max_new_tokens=2), LIMITS, tokenizer)
    text = "<user>hi</s>\n<assistant></s>\n<user>again</s>\n<assistant>"
    assert tokenizer.tokenizer.decode(valid.prompt_ids) == text
    with pytest.raises(InvalidRequest, match=r"messages\[0\].role must be a non-empty string"):
        validate(
            pb.GenerateRequest(messages=[pb.ChatMessage(content="x")], max_new_tokens=2),
            LIMITS,
            tokenizer,
        )


def test_a_template_that_does_not_compile_refuses_only_messages(toy_tokenizer: Tokenizer) -> None:
    ready = Ready(
        1,
        4,
        16,
        16,
        256,
        512,
        (0,),
        "cpu",
        "m",
        "llama",
        zlib.compress(toy_tokenizer.to_str().encode()),
        "{% if %}broken",
        "",
        "",
    )
    prompts = PromptEncoder.from_ready(ready)
    assert prompts.encode_text("hello") == toy_tokenizer.encode("hello").ids
    request = RequestFields(messages=[{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(
        InvalidRequest, match="messages: the model's chat template does not compile"
    ):
        validate_fields(request, LIMITS, prompts)
