"""`python -m client bench --api openai`: the load generator's plan through the OpenAI API.

Requests go through the official `openai` package's AsyncOpenAI to
`BASE/v1/completions` (the default: `prompt` as the plan's token ids, so both
APIs get exactly the same prompts) or `BASE/v1/chat/completions` (`--endpoint
chat`: the prompt as words in one user message, rendered with the chat
template; prompt tokens are then what the server counted). Every request
streams with `max_tokens`, `ignore_eos` (a shoal extra field) and
`stream_options.include_usage`, whose final usage gives the exact token counts.

`openai` is imported only here, and this module only for `--api openai`: install it
with the bench extra (`pip install -e '.[bench]'`) or `pip install openai`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from client.bench import RequestRecord

ENDPOINTS = ("completions", "chat")
# shoal answers an out-of-range prompt id with "prompt[0] = N must be in [0, V) (the vocab)".
_VOCAB_IN_ERROR = re.compile(r"must be in \[0, (\d+)\) \(the vocab\)")
_PROBE_ID = 2**31 - 1
# Chat prompts: the plan's token ids turned into common words (one token each in most
# English BPE vocabularies), so a seed gives the same text every run.
_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who its now find long down day did get come made may part"
)
WORDS = tuple(_WORD_TEXT.split())


def load_openai() -> ModuleType:
    try:
        import openai
    except ImportError:
        raise RuntimeError(
            "--api openai needs the openai package: pip install -e '.[bench]' "
            "(or pip install openai)"
        ) from None
    return openai


def base_url(target: str) -> str:
    """`http://host:port`, `host:port` or `.../v1` -> the API base AsyncOpenAI wants."""
    url = target.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/v1") else f"{url}/v1"


def chat_text(prompt: list[int]) -> str:
    return " ".join(WORDS[token % len(WORDS)] for token in prompt)


class OpenAIDriver:
    """A BenchDriver over AsyncOpenAI; `async with OpenAIDriver(...)` closes its connections.

    No retries (a retried 429 would hide the error and distort the timings); `model`
    defaults to the first id `GET /v1/models` lists.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        endpoint: str = "completions",
        model: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        self.openai = load_openai()
        self.base_url = base_url(target)
        kwargs: dict[str, Any] = {"base_url": self.base_url, "max_retries": 0}
        kwargs["api_key"] = api_key or "unused"  # the bearer token when --auth-token is set
        if timeout is not None:
            kwargs["timeout"] = timeout
        self.client = self.openai.AsyncOpenAI(**kwargs)
        self.endpoint = endpoint
        self.model = model
        self._vocab_size = vocab_size
        self.label = f"openai {self.base_url} ({endpoint})"

    async def __aenter__(self) -> OpenAIDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def model_id(self) -> str:
        if self.model is None:
            listed = await self.client.models.list()
            if not listed.data:
                raise RuntimeError(f"{self.base_url}/models lists no model: give --model")
            self.model = listed.data[0].id
        return self.model

    async def vocab_size(self) -> int:
        """--vocab-size, else what shoal's 400 for an out-of-range prompt id names."""
        if self._vocab_size is None:
            model = await self.model_id()
            message = ""
            try:
                await self.client.completions.create(model=model, prompt=[_PROBE_ID], max_tokens=1)
            except self.openai.BadRequestError as err:
                message = str(err)
            found = _VOCAB_IN_ERROR.search(message)
            if found is None:
                raise RuntimeError(
                    f"{self.base_url} did not name its vocab size (not a shoal server?): "
                    "give --vocab-size"
                )
            self._vocab_size = int(found.group(1))
        return self._vocab_size

    async def _stream(self, prompt: list[int], max_tokens: int) -> Any:
        common: dict[str, Any] = {
            "model": await self.model_id(),
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": {"ignore_eos": True},
        }
        if self.endpoint == "chat":
            messages = [{"role": "user", "content": chat_text(prompt)}]
            return await self.client.chat.completions.create(messages=messages, **common)
        return await self.client.completions.create(prompt=prompt, **common)

    async def warm_up(self, prompt: list[int]) -> None:
        async for _ in await self._stream(prompt, 4):
            pass

    async def send(
        self, record: RequestRecord, prompt: list[int], clock: Callable[[], float]
    ) -> None:
        """Each chunk with text counts as one token until the final usage gives the count
        (a token whose text is withheld, such as half a UTF-8 character, sends no chunk)."""
        usage = None
        async for chunk in await self._stream(prompt, record.max_new_tokens):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content if self.endpoint == "chat" else choice.text
                if text:
                    record.arrived(clock(), 1)
        if usage is not None:
            record.output_tokens = usage.completion_tokens
            record.prompt_tokens = usage.prompt_tokens

    def error_name(self, err: Exception) -> str | None:
        openai = self.openai
        if isinstance(err, openai.APIStatusError):
            return f"HTTP_{err.status_code}"
        if isinstance(err, openai.APITimeoutError):
            return "TIMEOUT"
        if isinstance(err, openai.APIConnectionError):
            return "CONNECTION_ERROR"
        if isinstance(err, openai.APIError):  # an error event in the middle of a stream
            return "STREAM_ERROR"
        return None
