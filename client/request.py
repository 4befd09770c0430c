"""Building a GenerateRequest from keyword arguments that mirror its field names.

Only what can't be put on the wire is checked here (an unknown priority name, a wrong type);
value limits (max_new_tokens > 0, top_p range, exactly one of prompt / prompt_token_ids /
messages) are
the server's job, so its INVALID_ARGUMENT messages reach the caller unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

from shoal.v1 import inference_pb2 as pb

PRIORITY_NAMES = ("HIGH", "NORMAL", "LOW")
_PRIORITY_PREFIX = "PRIORITY_"

# Accepted in JSONL input and by the library: names, prefixed names and wire numbers.
PriorityLike = str | int | None


class RequestParams(TypedDict, total=False):
    """Keyword arguments accepted by generate / generate_text / submit (besides prompt)."""

    prompt_token_ids: Iterable[int] | None
    messages: Iterable[Mapping[str, str]] | None
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    stop: Iterable[str]
    stop_token_ids: Iterable[int]
    ignore_eos: bool
    priority: PriorityLike
    request_id: str
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logprobs: bool
    top_logprobs: int


def parse_priority(value: PriorityLike) -> int:
    """ "HIGH" / "high" / "PRIORITY_HIGH" / pb.PRIORITY_HIGH / None -> the wire enum value."""
    if value is None:
        return pb.PRIORITY_UNSPECIFIED
    if isinstance(value, bool):  # bool is an int; True is no priority
        raise ValueError(f"priority must be one of HIGH, NORMAL, LOW (got {value!r})")
    if isinstance(value, int):
        if value in pb.Priority.values():
            return value
    elif isinstance(value, str):
        name = value.strip().upper().removeprefix(_PRIORITY_PREFIX)
        if name in (*PRIORITY_NAMES, "UNSPECIFIED"):
            return pb.Priority.Value(_PRIORITY_PREFIX + name)
    raise ValueError(f"priority must be one of HIGH, NORMAL, LOW (got {value!r})")


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Iterable[int] | None = None,
    messages: Iterable[Mapping[str, str]] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    priority: PriorityLike = None,
    request_id: str = "",
    repetition_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> pb.GenerateRequest:
    """Keyword arguments -> pb.GenerateRequest. TypeError/ValueError for unencodable values."""
    if isinstance(stop, str):  # a bare string would become one stop per character
        stop = [stop]
    request = pb.GenerateRequest(
        request_id=request_id or "",
        prompt_token_ids=list(prompt_token_ids or ()),
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        priority=parse_priority(priority),
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    # Optional fields: set only when given, so the server can tell "unset" from 0 / "".
    if prompt is not None:
        request.prompt = prompt
    if seed is not None:
        request.seed = seed
    return request
