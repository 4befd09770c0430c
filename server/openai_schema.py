"""Request bodies of the OpenAI-compatible API (pydantic), and their plain-value form.

Field names, types and defaults follow OpenAI's API reference for
`POST /v1/completions` and `POST /v1/chat/completions`; unknown fields are
ignored, as OpenAI does. Types are strict (a string is not a number). shoal's
own extra fields: `top_k`, `min_p`, `repetition_penalty`, `priority`,
`ignore_eos`. `to_fields` turns a body into the `RequestFields` that every
entry point validates (server/validation.py), one per choice.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.validation import InvalidRequest, RequestFields

UINT64 = 2**64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_logprobs: int | None = None
    # shoal's extra fields
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    priority: str | int = ""
    ignore_eos: bool = False

    def unsupported(self) -> list[str]:
        """Fields set to something the engine cannot do yet (issue: engine features)."""
        asked = {
            "logprobs": bool(getattr(self, "logprobs", None)),
            "top_logprobs": bool(self.top_logprobs),
            "frequency_penalty": self.frequency_penalty != 0,
            "presence_penalty": self.presence_penalty != 0,
            "repetition_penalty": self.repetition_penalty not in (None, 0, 1),
        }
        return [name for name, on in asked.items() if on]

    def new_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[dict[str, Any]]:
        """Each prompt as the RequestFields keyword that carries it."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if not p:
            raise InvalidRequest("prompt must not be empty")
        if all(isinstance(x, str) for x in p):
            return [{"prompt": x} for x in p]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        return [{"prompt_token_ids": x} for x in p]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False

    def prompts(self) -> list[dict[str, Any]]:
        return [{"messages": [{"role": m.role, "content": m.text()} for m in self.messages]}]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # None: what the context leaves


def to_fields(body: CompletionRequest | ChatRequest) -> list[list[RequestFields]]:
    """RequestFields per prompt, per choice (`n`); seeds of choice i are seed + i.

    InvalidRequest naming the field for what the engine cannot do yet.
    """
    unsupported = body.unsupported()
    if unsupported:
        raise InvalidRequest(f"{unsupported[0]} is not supported yet")
    if body.echo if isinstance(body, CompletionRequest) else False:
        raise InvalidRequest("echo is not supported")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    common: dict[str, Any] = {
        "max_new_tokens": body.new_tokens(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": 0 if body.top_k == -1 else body.top_k,  # vLLM's "off" too
        "min_p": body.min_p,
        "stop": stop,
        "ignore_eos": body.ignore_eos,
        "priority": body.priority,
    }
    return [
        [
            RequestFields(**prompt, **common, seed=_choice_seed(body.seed, i))
            for i in range(body.n)
        ]
        for prompt in body.prompts()
    ]


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i draws with seed + i (wrapping within uint64); a bad seed is left to validation."""
    if seed is None or not 0 <= seed < UINT64:
        return seed
    return (seed + choice) % UINT64
