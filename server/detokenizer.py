"""Incremental, UTF-8-safe detokenization with stop strings.

Tokens arrive a few at a time; the text sent for them must never hold half a
character, and text that might be the start of a stop string is held back until
it is known not to be. Concatenating everything emitted (plus `finish()`) gives
`tokenizer.decode(all_ids)`, or that text cut just before the first stop string
to appear.

Why not `tokenizers.decoders.DecodeStream`: it gives the same text while a
sequence runs, but it has no flush, so bytes that never complete a character
(e.g. a lone b"\\xf0" at the end) are lost, and its token window is hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole character
# Tokens kept as left context after each clean boundary: decoders that strip a
# leading space from the first token (SentencePiece) need the token before.
CONTEXT_TOKENS = 4
# Safety valve: a run this long with no clean boundary is garbage bytes that will
# never complete; flush it instead of re-decoding an ever-growing window.
MAX_PENDING_TOKENS = 64
# A character is at most 4 bytes and every token adds at least one: text that has ended
# in U+FFFD for this many tokens in a row holds bytes that can never form a character.
# Those U+FFFD are sent then, all but the last (which may stand for the start of a new
# character); without this a garbage byte run would be withheld up to MAX_PENDING_TOKENS.
MAX_CHAR_BYTES = 4


class TokenDecoder(Protocol):
    """What detokenization needs of a `tokenizers.Tokenizer`."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def get_added_tokens_decoder(self) -> dict[int, Any]: ...


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text, safe to send
    stopped: bool = False  # a stop string appeared: text ends just before it; no more text


class _StreamDecoder:
    """Token ids -> text, a window at a time (prefix-offset technique).

    `window` holds a few already-emitted context tokens plus the pending ones;
    only it is decoded per call, so the cost per token stays constant. Text up to
    the last whole character is emitted at once; the window is trimmed only at a
    clean boundary, where its text does not end in U+FFFD.
    """

    def __init__(self, tokenizer: TokenDecoder, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Skipped tokens are dropped before the window: a context of only those
        # would decode to "" and let the decoder strip the next token's leading space.
        added = tokenizer.get_added_tokens_decoder() if skip_special_tokens else {}
        self._skipped = frozenset(i for i, token in added.items() if token.special)
        self._window: list[int] = []
        self._context = 0  # leading tokens of the window that are context only
        self._emitted = 0  # characters of decode(window) already emitted
        self._unclean = 0  # tokens in a row after which the text ended in U+FFFD

    def add(self, ids: Sequence[int]) -> str:
        # One token at a time: a clean boundary inside `ids` must be seen (MAX_CHAR_BYTES).
        return "".join([self._add_one(i) for i in ids if i not in self._skipped])

    def _add_one(self, token: int) -> str:
        self._window.append(token)
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT):
            if len(self._window) - self._context > MAX_PENDING_TOKENS:
                return self.flush()
            self._unclean += 1
            # The trailing U+FFFD run may still change (more bytes may complete it), unless
            # it has lasted MAX_CHAR_BYTES tokens: then only its last one may.
            stable = len(text.rstrip(REPLACEMENT))
            if self._unclean >= MAX_CHAR_BYTES:
                stable = len(text) - 1
            delta = text[self._emitted : stable]
            self._emitted = max(self._emitted, stable)
            return delta
        self._unclean = 0
        delta = text[self._emitted :]
        self._trim(text)
        return delta

    def flush(self) -> str:
        """Everything not yet emitted, whole or not; the stream starts afresh."""
        delta = self._decode(self._window)[self._emitted :]
        self._window, self._context, self._emitted, self._unclean = [], 0, 0, 0
        return delta

    def _trim(self, text: str) -> None:
        """At a clean boundary, keep only a few tokens of the window as left context."""
        n = len(self._window)
        for size in [*range(min(n, CONTEXT_TOKENS), 0, -1), *range(CONTEXT_TOKENS + 1, n)]:
            context = self._decode(self._window[n - size :])
            # The context must decode to the end of the text: not start inside a
            # character or a byte-fallback run, and not be empty (see __init__).
            if context and text.endswith(context):
                break
        else:  # nothing fits (text that decodes to ""): keep all, within reason
            size = n if n <= MAX_PENDING_TOKENS else 0
            context = text if size else ""
        self._window = self._window[n - size :]
        self._context, self._emitted = size, len(context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


class _StopMatcher:
    """Finds stop strings in a text stream, holding back a possible partial match."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # a suffix that is the start of some stop string
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        keep = 0 if final else self._partial_match(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def _first_match(self, buffer: str) -> int | None:
        """Start of the occurrence that ends first (the longest on a tie), if any.

        Ending first is what a token-by-token stream sees first, so the cut does
        not depend on how the tokens were chunked.
        """
        best: tuple[int, int] | None = None
        for stop in self._stop:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            tail = buffer[max(0, len(buffer) - len(stop) + 1) :] if len(stop) > 1 else ""
            start = tail.find(stop[0])
            while start >= 0:
                if stop.startswith(tail[start:]):
                    longest = max(longest, len(tail) - start)
                    break
                start = tail.find(stop[0], start + 1)
        return longest


class IncrementalText:
    """Detokenizes one request's completion as its tokens arrive.

    `add` returns the text that may be sent now; `finish` returns whatever was
    held back, for when the request ends for another reason than a stop string.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = _StreamDecoder(tokenizer, skip_special_tokens)
        self._stops = _StopMatcher(stop)
        self._finished = False

    @property
    def stopped(self) -> bool:
        """A stop string appeared (possibly in the text `finish` flushed)."""
        return self._stops.stopped

    def add(self, token_ids: Sequence[int]) -> TextDelta:
        if self._finished or self._stops.stopped:
            return TextDelta("", self._stops.stopped)
        text = self._stops.feed(self._decoder.add(token_ids))
        return TextDelta(text, self._stops.stopped)

    def finish(self) -> str:
        """Flush held-back text (still cut at a stop string found in it); idempotent."""
        if self._finished or self._stops.stopped:
            return ""
        self._finished = True
        return self._stops.feed(self._decoder.flush(), final=True)
