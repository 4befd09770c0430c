"""shoal's TokenLogprobs in the two shapes of OpenAI's API reference.

- Chat completions (`logprobs: true`, `top_logprobs: n`): `choices[].logprobs` is
  `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": null}`, one entry per generated token.
- Legacy completions (`logprobs: n`): `{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}`, parallel lists; each `top_logprobs` entry is
  a {token text: logprob} map of the n most likely tokens plus the sampled one
  (OpenAI: "up to logprobs+1 elements"); `text_offset` is where each token's
  text starts, counting the token texts in characters from the start of the
  completion (vLLM's rule; with no `echo` the prompt is not counted).

Token texts and bytes come from server/token_text.py. The values are those
worker/sampling.py `token_logprobs` defines (after penalties and temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.token_text import TokenTexts
from worker.channel.types import TokenLogprob


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": texts.text(token_id),
            "logprob": logprob,
            "bytes": list(texts.bytes(token_id)),
        }

    content = [
        entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    texts: TokenTexts, logprobs: Sequence[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """`offset`: the text offset of the first token (a stream's earlier tokens' texts)."""
    tokens = [texts.text(lp.token_id) for lp in logprobs]
    top: list[dict[str, float]] = []
    for lp, token in zip(logprobs, tokens, strict=True):
        alternatives: dict[str, float] = {}
        for token_id, value in lp.top:
            alternatives.setdefault(texts.text(token_id), value)  # two ids, one text: the likelier
        alternatives.setdefault(token, lp.logprob)
        top.append(alternatives)
    starts = []
    for token in tokens:
        starts.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": top,
        "text_offset": starts,
    }


def text_length(texts: TokenTexts, logprobs: Sequence[TokenLogprob]) -> int:
    """Characters the tokens' texts take: where the next chunk's text_offset starts."""
    return sum(len(texts.text(lp.token_id)) for lp in logprobs)
