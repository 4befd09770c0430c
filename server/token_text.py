"""One token's own bytes and text, for the logprobs of the OpenAI-compatible API.

OpenAI's logprobs name each token by its text (`token`) and its UTF-8 bytes
(`bytes`); a token that holds only part of a character has no text of its own,
so `bytes` are what a client joins. A token's bytes are read from the vocabulary
itself, not by decoding the token alone (which turns partial characters into
U+FFFD and, with SentencePiece, drops a leading space):

- an added (special) token: its content, e.g. "<|im_end|>";
- byte-level BPE (GPT-2, Llama 3, SmolLM: a ByteLevel decoder): each character
  of the vocabulary entry maps back to one byte (GPT-2's bytes_to_unicode);
- a byte-fallback entry "<0xE2>": that byte;
- otherwise (SentencePiece): the piece with "▁" as a space.

`text(id)` is those bytes as UTF-8, or, when they are not valid UTF-8, OpenAI's
form for such tokens: "bytes:" and each byte as \\xNN.
"""

from __future__ import annotations

import json
import re
from functools import cache

from tokenizers import Tokenizer, pre_tokenizers

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_map() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


def _uses_byte_level(tokenizer: Tokenizer) -> bool:
    decoder = tokenizer.decoder
    if decoder is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(decoder.__getstate__()))


class TokenTexts:
    """token id -> (bytes, text), cached; built from the front's tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _uses_byte_level(tokenizer)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[bytes, str]] = {}

    def bytes(self, token_id: int) -> bytes:
        return self._entry(token_id)[0]

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[bytes, str]:
        entry = self._cache.get(token_id)
        if entry is None:
            raw = self._raw(token_id)
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            entry = self._cache[token_id] = (raw, text)
        return entry

    def _raw(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:  # not in the vocabulary (a padded embedding row)
            return b""
        if self._byte_level:
            chars = _byte_level_map()
            return b"".join(bytes([chars[c]]) if c in chars else c.encode() for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
