"""Request bodies of the OpenAI-compatible API (pydantic), and their plain-value form.

Field names, types and defaults follow OpenAI's API reference for
`POST /v1/completions` and `POST /v1/chat/completions`; unknown fields are
ignored and `null` means the default, as OpenAI does. Types are strict (a
string is not a number); text must be valid Unicode (no lone surrogates).
shoal's own extra fields: `top_k`, `min_p`, `repetition_penalty`,
`priority`, `ignore_eos`. `to_fields` turns a body into the `RequestFields`
that every entry point validates (server/validation.py), one per choice.
Errors are OpenAI error objects (`ApiError`), naming the field as sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.validation import InvalidRequest, RequestFields

UINT64 = 2**64


class ApiError(Exception):
    """An OpenAI error object and its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}


def _unicode(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can take."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"temperature": null` and the like: OpenAI's fields are "number or null"."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: Text | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Text | list[Text] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # shoal's extra fields
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0  # 0 or 1 = off
    priority: Text | int = ""
    ignore_eos: bool = False

    def logprob_fields(self) -> dict[str, Any]:
        """The RequestFields `logprobs` and `top_logprobs` this body asks for."""
        raise NotImplementedError

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def http_names(self) -> dict[str, str]:
        """What validation's field names are called in this body."""
        return {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # legacy: the number of alternatives; 0 = the sampled token's
    echo: bool = False

    def logprob_fields(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0}

    def http_names(self) -> dict[str, str]:
        return super().http_names() | {"top_logprobs": "logprobs"}

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
        for i, ids in enumerate(p):
            if not ids:
                raise InvalidRequest(f"prompt[{i}] must not be empty")
        return [{"prompt_token_ids": x} for x in p]


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Text
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # needs logprobs: true, as OpenAI requires

    def logprob_fields(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    def prompts(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise InvalidRequest("messages must not be empty")
        return [{"messages": [{"role": m.role, "content": m.text()} for m in self.messages]}]

    def new_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's newer name) over max_tokens; None: what the
        context leaves."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def http_names(self) -> dict[str, str]:
        tokens = "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"
        return {"max_new_tokens": tokens, "prompt": "messages"}


def to_fields(body: CompletionRequest | ChatRequest) -> list[list[RequestFields]]:
    """RequestFields per prompt, per choice (`n`); seeds of choice i are seed + i.

    InvalidRequest naming the field for what the engine cannot do yet (`echo`).
    """
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
        "repetition_penalty": body.repetition_penalty,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        **body.logprob_fields(),
    }
    return [
        [RequestFields(**prompt, **common, seed=_choice_seed(body.seed, i)) for i in range(body.n)]
        for prompt in body.prompts()
    ]


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i draws with seed + i (wrapping within uint64); a bad seed is left to validation."""
    if seed is None or not 0 <= seed < UINT64:
        return seed
    return (seed + choice) % UINT64


def invalid(message: str, names: Mapping[str, str]) -> ApiError:
    """A validation message as a 400; `names` renames validation's fields as the body has them."""
    for name, http in names.items():
        message = re.sub(rf"\b{name}\b", http, message)
    param = re.match(r"[a-z_]+", message)
    return ApiError(400, message, param=param.group(0) if param else None)


# Where pydantic's location names a member of a union (`str`, `list[int]`), not a field.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool)$|\[")
_VALIDATOR = re.compile(r"function-after\[\w+\(\), (\w+)\]")  # Text: shown as str


def body_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """pydantic's errors for a body as one 400 naming its most specific field
    (`messages[0].content[0].type`), and the accepted forms where a union failed."""
    if not errors:
        return ApiError(400, "invalid body")
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the first of the deepest
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON: {reason}".rstrip(": "))
    loc = tuple(first.get("loc", ()))
    param, forms = "", []
    for at, part in enumerate(loc):
        if isinstance(part, int):
            param += f"[{part}]"
        elif _UNION_MEMBER.search(str(part)):
            if not forms:  # every member tried at this place
                tried = [tuple(e.get("loc", ())) for e in errors]
                here = [str(t[at]) for t in tried if len(t) > at and t[:at] == loc[:at]]
                forms = list(dict.fromkeys(_VALIDATOR.sub(r"\1", member) for member in here))
        elif part != "body":
            param += f".{part}" if param else str(part)
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{param or 'body'}: {reason}"
    if forms:
        message += f" (accepted forms: {', '.join(forms)})"
    return ApiError(400, message, param=param or None)
