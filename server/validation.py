"""Request validation: the edge where a protobuf GenerateRequest becomes plain data.

Everything past this point trusts its input, so every field is checked here and
every error message names the field and the limit (sent as INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal.v1 import inference_pb2 as pb
from worker.sequence import Priority, SamplingParams

# Wire enum -> engine enum; UNSPECIFIED is NORMAL (see inference.proto).
_PRIORITIES: dict[int, Priority] = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_HIGH: Priority.HIGH,
    pb.PRIORITY_NORMAL: Priority.NORMAL,
    pb.PRIORITY_LOW: Priority.LOW,
}


class InvalidRequest(ValueError):
    """A bad GenerateRequest; the message names the field and the limit."""


class _Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class TextEncoder(Protocol):
    """What validation needs of a `tokenizers.Tokenizer`."""

    def encode(self, sequence: str) -> _Encoding: ...


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int  # prompt + max_new_tokens must fit
    max_new_tokens_limit: int
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters
    max_request_id_bytes: int = 128
    max_stop_token_ids: int = 64


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str | None  # None: the server assigns one
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority
    stop: tuple[str, ...]


def validate(
    request: pb.GenerateRequest, limits: Limits, tokenizer: TextEncoder
) -> ValidatedRequest:
    """Check every field of `request` against `limits`; raise InvalidRequest on the first fault."""
    request_id = _request_id(request.request_id, limits)
    priority = _priority(request.priority)
    max_new = request.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidRequest(
            f"max_new_tokens must be in [1, {limits.max_new_tokens_limit}] (got {max_new})"
        )
    temperature, top_p = request.temperature, request.top_p
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"temperature must be finite and >= 0 (got {temperature})")
    if not 0 <= top_p <= 1:  # also false for NaN
        raise InvalidRequest(f"top_p must be in [0, 1] (got {top_p})")
    if request.top_k > limits.vocab_size:
        raise InvalidRequest(
            f"top_k must be <= the vocab size {limits.vocab_size} (got {request.top_k})"
        )
    stop = _stop_strings(request.stop, limits)
    stop_token_ids = _stop_token_ids(request.stop_token_ids, limits)
    prompt_ids = _prompt_ids(request, limits, tokenizer)
    if len(prompt_ids) + max_new > limits.max_context:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) must fit the "
            f"model context of {limits.max_context} tokens"
        )
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=request.top_k,
        top_p=top_p if 0 < top_p < 1 else 1.0,  # 0 and 1 both mean off
        # Drawn here, not in the worker, so a request resumed elsewhere draws the same tokens.
        seed=request.seed if request.HasField("seed") else int.from_bytes(os.urandom(8), "little"),
        stop_token_ids=stop_token_ids,
        ignore_eos=request.ignore_eos,
    )
    return ValidatedRequest(request_id, prompt_ids, params, priority, stop)


def _request_id(request_id: str, limits: Limits) -> str | None:
    size = len(request_id.encode())
    if size > limits.max_request_id_bytes:
        raise InvalidRequest(
            f"request_id is {size} bytes; at most {limits.max_request_id_bytes} are allowed"
        )
    return request_id or None


def _priority(value: int) -> Priority:
    # proto3 enums are open: any int32 can arrive on the wire.
    if value not in _PRIORITIES:
        raise InvalidRequest(f"priority {value} is unknown; must be in [0, {max(_PRIORITIES)}]")
    return _PRIORITIES[value]


def _stop_strings(stop: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"stop has {len(stop)} strings; at most {limits.max_stop_strings} are allowed"
        )
    for i, text in enumerate(stop):
        if not 1 <= len(text) <= limits.max_stop_length:
            raise InvalidRequest(
                f"stop[{i}] is {len(text)} characters; must be 1 to {limits.max_stop_length}"
            )
    return tuple(stop)


def _stop_token_ids(ids: Sequence[int], limits: Limits) -> tuple[int, ...]:
    if len(ids) > limits.max_stop_token_ids:
        raise InvalidRequest(
            f"stop_token_ids has {len(ids)} ids; at most {limits.max_stop_token_ids} are allowed"
        )
    _check_vocab("stop_token_ids", ids, limits.vocab_size)
    return tuple(ids)


def _prompt_ids(request: pb.GenerateRequest, limits: Limits, tokenizer: TextEncoder) -> list[int]:
    has_text, has_ids = request.HasField("prompt"), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        got = "both" if has_text else "neither"
        raise InvalidRequest(f"exactly 1 of prompt or prompt_token_ids must be set (got {got})")
    if has_ids:
        ids = list(request.prompt_token_ids)
        _check_vocab("prompt_token_ids", ids, limits.vocab_size)
        return ids
    if not request.prompt:
        raise InvalidRequest("prompt must be at least 1 character (got an empty string)")
    ids = list(tokenizer.encode(request.prompt).ids)
    if not ids:
        raise InvalidRequest("prompt must give at least 1 token (it tokenized to none)")
    return ids


def _check_vocab(field: str, ids: Sequence[int], vocab_size: int) -> None:
    if not ids or max(ids) < vocab_size:  # the common case, without a Python loop
        return
    for i, token in enumerate(ids):
        if token >= vocab_size:
            raise InvalidRequest(f"{field}[{i}] = {token} must be < the vocab size {vocab_size}")
