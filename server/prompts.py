"""PromptEncoder: text prompts and conversations -> token ids, with the worker's tokenizer.

The front never reads a checkpoint: the tokenizer (as `tokenizers` JSON) and
the chat template arrive in the worker's Ready message, so an HF directory
and a GGUF file look the same from here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

from server.chat import ChatTemplate, ChatTemplateError
from server.validation import OFF_LOOP_BYTES
from worker.channel.messages import Ready


class PromptEncoder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None = None,
        template_error: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # Why a template that came with the model is unusable ("" when none came).
        self.template_error = template_error

    @classmethod
    def from_ready(cls, ready: Ready) -> PromptEncoder:
        """A model whose template does not compile still serves prompts; `messages` get
        INVALID_ARGUMENT with the compiler's reason."""
        tokenizer = Tokenizer.from_str(zlib.decompress(ready.tokenizer_zlib).decode())
        if not ready.chat_template:
            return cls(tokenizer)
        try:
            return cls(
                tokenizer, ChatTemplate(ready.chat_template, ready.bos_token, ready.eos_token)
            )
        except ChatTemplateError as err:
            return cls(tokenizer, template_error=str(err))

    def encode_text(self, text: str) -> list[int]:
        """A plain prompt, with the tokenizer's own special tokens (e.g. a BOS)."""
        return _encode(self.tokenizer, text, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A conversation rendered with the chat template and `add_generation_prompt`.

        The rendering already holds the special tokens it needs (transformers
        tokenizes it with add_special_tokens=False too). ChatTemplateError if
        the model has no template or the template refuses the messages.
        """
        if self.chat_template is None:
            raise ChatTemplateError(
                self.template_error
                or "this model has no chat template: send prompt or prompt_token_ids instead"
            )
        text = self.chat_template.render(messages)
        return _encode(self.tokenizer, text, add_special_tokens=False)


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """A big text (validation tokenizes those in a worker thread) goes through `encode_batch`,
    which gives the same ids as `encode` but releases the GIL while it runs, so the event
    loop runs on; a small one through `encode` (no thread pool, no GIL hand-over)."""
    if len(text) <= OFF_LOOP_BYTES:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
