"""Request validation on plain values: every entry point (gRPC, JSONL) checks here.

An edge turns its own format into `RequestFields` (the GenerateRequest field
names, plain Python values): server/proto_json.py from protobuf (a gRPC request,
or a JSONL line parsed as the proto JSON of GenerateRequest), server/openai_schema.py
from an OpenAI body. `validate` then checks every field against the model's
`Limits` and returns a `ValidatedRequest`; everything past it trusts its
input. Every error names the field and the limit.

No request may stall the event loop: text (a prompt, or all message contents
together) is bounded by `Limits.max_prompt_bytes` (UTF-8 bytes, default 1 MiB),
checked before tokenizing, and the edges call `validate_off_loop`, which
tokenizes text over OFF_LOOP_BYTES in a worker thread (server/prompts.py's
encoder releases the GIL while it runs).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.memory import trim
from worker.channel.types import MAX_TOP_LOGPROBS, Priority, SamplingParams

# shoal.v1.Priority by name (with or without the PRIORITY_ prefix) and by number, as
# the proto3 JSON mapping allows both; UNSPECIFIED (and "") mean NORMAL.
PRIORITY_NAMES = {"": Priority.NORMAL, "UNSPECIFIED": Priority.NORMAL, **Priority.__members__}
PRIORITY_NUMBERS = (Priority.NORMAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
UINT64 = 2**64
MAX_PROMPT_BYTES = 1 << 20  # the default Limits.max_prompt_bytes
MAX_REQUEST_ID_BYTES = 128  # the default Limits.max_request_id_bytes
OFF_LOOP_BYTES = 16 << 10  # text prompts above this are tokenized in a worker thread
# repetition_penalty: 0 or 1 = off, else in [1 / MAX, MAX]. A seen token's logit is divided
# or multiplied by it; past 100 (either way) every seen token is in effect banned or forced
# already, and the bound keeps penalised logits finite in float32 (a positive logit over a
# subnormal penalty would overflow).
MAX_REPETITION_PENALTY = 100.0
MAX_FREQUENCY_PENALTY = 2.0  # frequency_penalty and presence_penalty in [-2, 2] (OpenAI's)
# One thread: big prompts wait for each other (each takes at most ~2 s: max_prompt_bytes),
# the event loop never does. Memory the tokenizer freed can stay in that thread's malloc
# arena (RSS that never comes down) unless given back with malloc_trim after each one.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-tokenize")


def _validate_and_trim(
    request: RequestFields, limits: Limits, prompts: Prompts
) -> ValidatedRequest:
    try:
        return validate(request, limits, prompts)
    finally:
        trim()


class InvalidRequest(ValueError):
    """A bad request; the message names the field and the limit."""


class Prompts(Protocol):
    """What validation needs to turn a prompt into token ids (server/prompts.py)."""

    def encode_text(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """ValueError (with the reason) when the model cannot render these messages."""
        ...


@dataclass(frozen=True)
class RequestFields:
    """A GenerateRequest as plain values, before any check (see inference.proto)."""

    request_id: str = ""
    prompt: str | None = None
    prompt_token_ids: Sequence[int] = ()
    messages: Sequence[Mapping[str, Any]] = ()  # {"role": ..., "content": ...}
    max_new_tokens: int | None = 0  # None: as many as the context leaves (HTTP's default)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    min_p: float = 0.0
    seed: int | None = None  # None: the server draws one
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    priority: str | int = ""  # a shoal.v1.Priority name or number; "" = NORMAL
    repetition_penalty: float = 0.0  # 0 or 1 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0  # needs logprobs


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int  # prompt + max_new_tokens must fit (the model's context and the KV pool)
    max_new_tokens_limit: int
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters
    max_request_id_bytes: int = MAX_REQUEST_ID_BYTES
    max_stop_token_ids: int = 64
    max_messages: int = 1024
    # UTF-8 bytes of a text prompt, or of all message contents together, checked before
    # tokenizing (1 MiB: ~250k tokens of English, past any context shoal serves; tokenizing
    # it takes ~1-2 s, off the event loop).
    max_prompt_bytes: int = MAX_PROMPT_BYTES


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str | None  # None: the server assigns one
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority
    stop: tuple[str, ...] = field(default=())


async def validate_off_loop(
    request: RequestFields, limits: Limits, prompts: Prompts
) -> ValidatedRequest:
    """`validate`, in a worker thread when the text to tokenize is big (see the module doc)."""
    size = len(request.prompt or "") + sum(
        len(m.get("content") or "") for m in request.messages if isinstance(m, Mapping)
    )  # characters: cheap, and at most the UTF-8 size
    if size > OFF_LOOP_BYTES:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _TOKENIZER_THREAD, _validate_and_trim, request, limits, prompts
        )
    return validate(request, limits, prompts)


def validate(request: RequestFields, limits: Limits, prompts: Prompts) -> ValidatedRequest:
    """Check every field against `limits`; raise InvalidRequest on the first fault."""
    r = request
    request_id = _request_id(r.request_id, limits)
    priority = _priority(r.priority)
    if r.max_new_tokens is not None and not 1 <= r.max_new_tokens <= limits.max_new_tokens_limit:
        # proto3 sends no zero: a field left out (or, in JSON, misnamed and dropped by a
        # lenient client library) arrives as 0, indistinguishable from an explicit 0.
        got = "0: not set, or 0" if r.max_new_tokens == 0 else r.max_new_tokens
        raise InvalidRequest(
            f"max_new_tokens must be in [1, {limits.max_new_tokens_limit}] (got {got})"
        )
    if not (math.isfinite(r.temperature) and r.temperature >= 0):
        raise InvalidRequest(f"temperature must be finite and >= 0 (got {r.temperature:.7g})")
    for name in ("top_p", "min_p"):
        value = getattr(r, name)
        if not 0 <= value <= 1:  # also false for NaN
            raise InvalidRequest(f"{name} must be in [0, 1] (got {value:.7g})")
    if not 0 <= r.top_k <= limits.vocab_size:
        raise InvalidRequest(f"top_k must be in [0, {limits.vocab_size}] (the vocab size)")
    if r.seed is not None and not 0 <= r.seed < UINT64:
        raise InvalidRequest(f"seed must be in [0, 2**64) (got {r.seed})")
    repetition_penalty = _penalties(r)
    _logprobs(r, min(MAX_TOP_LOGPROBS, limits.vocab_size))
    stop = _stop_strings(r.stop, limits)
    stop_token_ids = _stop_token_ids(r.stop_token_ids, limits)
    prompt_ids = _prompt_ids(r, limits, prompts)
    max_new = r.max_new_tokens
    if max_new is None:
        max_new = max(1, min(limits.max_new_tokens_limit, limits.max_context - len(prompt_ids)))
    if len(prompt_ids) + max_new > limits.max_context:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) must fit the "
            f"context of {limits.max_context} tokens (max_context: the model's context or "
            "one worker's KV cache, whichever is smaller)"
        )
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p if 0 < r.top_p < 1 else 1.0,  # 0 and 1 both mean off
        min_p=r.min_p,
        # Drawn here, not in the worker, so a request resumed elsewhere draws the same tokens.
        seed=r.seed if r.seed is not None else int.from_bytes(os.urandom(8), "little"),
        stop_token_ids=stop_token_ids,
        ignore_eos=r.ignore_eos,
        repetition_penalty=repetition_penalty,
        frequency_penalty=r.frequency_penalty,
        presence_penalty=r.presence_penalty,
        logprobs=r.logprobs,
        top_logprobs=r.top_logprobs,
    )
    return ValidatedRequest(request_id, prompt_ids, params, priority, stop)


def _penalties(r: RequestFields) -> float:
    """Check the three penalties; the repetition penalty as the engine takes it (1 = off)."""
    low, high = 1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY
    p = r.repetition_penalty
    # gRPC carries a float32: 0.01 arrives as 0.0099999998, which is still the bound.
    if p != 0 and not low * (1 - 1e-6) <= p <= high:  # also true for NaN
        raise InvalidRequest(
            f"repetition_penalty must be 0 (off) or in [{low:g}, {high:g}] (got {p:.7g})"
        )
    limit = MAX_FREQUENCY_PENALTY
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(r, name)
        if not -limit <= value <= limit:
            raise InvalidRequest(f"{name} must be in [{-limit:g}, {limit:g}] (got {value:.7g})")
    return p if p != 0 else 1.0


def _logprobs(r: RequestFields, limit: int) -> None:
    """top_logprobs in [0, 20] (fewer for a vocab under 20), and only with logprobs (as
    OpenAI's chat API requires)."""
    if not 0 <= r.top_logprobs <= limit:
        raise InvalidRequest(f"top_logprobs must be in [0, {limit}] (got {r.top_logprobs})")
    if r.top_logprobs and not r.logprobs:
        raise InvalidRequest(
            f"top_logprobs ({r.top_logprobs}) needs logprobs to be true (got false)"
        )


def _priority(value: str | int) -> Priority:
    if isinstance(value, int):  # proto3 enums are open: any int32 can arrive on the wire
        if not 0 <= value < len(PRIORITY_NUMBERS):
            raise InvalidRequest(f"priority {value} is unknown; must be in [0, 3]")
        return PRIORITY_NUMBERS[value]
    priority = PRIORITY_NAMES.get(value.upper().removeprefix("PRIORITY_"))
    if priority is None:
        raise InvalidRequest(f"priority must be HIGH, NORMAL or LOW (got {value!r})")
    return priority


def _request_id(request_id: str, limits: Limits) -> str | None:
    check_request_id(request_id, limits.max_request_id_bytes)
    return request_id or None


def check_request_id(request_id: str, limit: int = MAX_REQUEST_ID_BYTES) -> None:
    """Also for the ids that name a request (Stream, Cancel): none longer was ever admitted,
    and an error echoing a huge one would pass gRPC's metadata limit."""
    size = len(request_id.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequest(f"request_id is {size} bytes; at most {limit} are allowed")


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


def _prompt_ids(request: RequestFields, limits: Limits, prompts: Prompts) -> list[int]:
    given = [
        name
        for name, present in (
            ("prompt", request.prompt is not None),
            ("prompt_token_ids", len(request.prompt_token_ids) > 0),
            ("messages", len(request.messages) > 0),
        )
        if present
    ]
    if len(given) != 1:
        got = " and ".join(given) or "none"
        raise InvalidRequest(
            f"exactly 1 of prompt, prompt_token_ids or messages must be set (got {got})"
        )
    if request.prompt_token_ids:
        ids = list(request.prompt_token_ids)
        _check_vocab("prompt_token_ids", ids, limits.vocab_size)
        return ids
    if request.messages:
        ids = _chat_ids(request.messages, limits, prompts)
    elif not request.prompt:
        raise InvalidRequest("prompt must be at least 1 character (got an empty string)")
    else:
        _check_text_bytes("prompt", [request.prompt], limits)
        ids = prompts.encode_text(request.prompt)
    if not ids:
        raise InvalidRequest(f"{given[0]} must give at least 1 token (it tokenized to none)")
    return ids


def _chat_ids(messages: Sequence[Mapping[str, Any]], limits: Limits, prompts: Prompts) -> list[int]:
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(messages)} entries; at most {limits.max_messages} are allowed"
        )
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string (got {role!r})")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string (got {content!r})")
    _check_text_bytes("messages", [m["content"] for m in messages], limits)
    try:
        return prompts.encode_chat(messages)
    except ValueError as err:
        raise InvalidRequest(f"messages: {err}") from None


def _check_text_bytes(name: str, texts: Sequence[str], limits: Limits) -> None:
    """Before tokenizing: the UTF-8 size of `texts` against max_prompt_bytes."""
    limit = limits.max_prompt_bytes
    if sum(map(len, texts)) * 4 <= limit:  # 4 bytes per character at most: no encoding needed
        return
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > limit:
        what = "prompt is" if name == "prompt" else "messages' contents are"
        raise InvalidRequest(
            f"{what} {size} bytes (UTF-8); at most {limit} are allowed (max_prompt_bytes)"
        )


def _check_vocab(name: str, ids: Sequence[int], vocab_size: int) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):  # the common case, no Python loop
        return
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"{name}[{i}] = {token} must be in [0, {vocab_size}) (the vocab)")
