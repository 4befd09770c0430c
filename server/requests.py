"""Request state on the front: tokens and text as they arrive, listeners, retention.

A request's completion is kept token by token, with the text each token
released (text held back by the detokenizer is attributed to the token that
releases it). Any listener can therefore replay from any token index and
then follow live; finished requests stay for a bounded time and count.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.detokenizer import IncrementalText
from server.validation import ValidatedRequest
from worker.channel.types import FinishReason, TokenLogprob


class RequestError(Exception):
    """A request ended by the server, not the model (e.g. its worker died)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name, kept free of grpc here


@dataclass
class Chunk:
    """Plain form of a GenerateChunk; the servicer converts it at the edge."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason = FinishReason.NONE
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked


@dataclass(eq=False)
class RequestState:
    request_id: str
    handle: int
    request: ValidatedRequest
    text: IncrementalText
    arrival: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    worker: int | None = None
    resumptions: int = 0  # times put back in the queue after its worker died
    token_ids: list[int] = field(default_factory=list)
    text_deltas: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # parallel to token_ids, if asked
    # Prompt tokens found in a worker's prefix cache when the request first started
    # there (None until a worker reports; a resumed request keeps the first report).
    cached_prompt_tokens: int | None = None
    # Text held back until the end (half a character, a possible stop-string prefix):
    # it belongs to the end, not to a token, so a live listener past the last token
    # gets it in the last chunk exactly as a replay from any index does.
    tail: str = ""
    finish_reason: FinishReason = FinishReason.NONE
    error: RequestError | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def add_tokens(
        self, token_ids: list[int], logprobs: list[TokenLogprob | None] | None = None
    ) -> bool:
        """Append generated tokens (and their logprobs, when the request asked for them);
        True when a stop string ended the request."""
        self.last_token_at = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at
        for i, token in enumerate(token_ids):
            delta = self.text.add([token])
            self.token_ids.append(token)
            self.text_deltas.append(delta.text)
            logprob = logprobs[i] if logprobs is not None else None
            if logprob is not None:
                self.logprobs.append(logprob)
            if delta.stopped:
                self.finish(FinishReason.STOP, flush=False)  # nothing after a stop string
                return True
        self.notify()
        return False

    def finish(
        self, reason: FinishReason, error: RequestError | None = None, flush: bool = True
    ) -> None:
        if self.finished:
            return
        if flush:
            self.tail = self.text.finish()  # held back in case a stop string followed
            if self.text.stopped and reason != FinishReason.CANCELLED:
                reason = FinishReason.STOP  # the flushed text completed a stop string
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- timing: seconds from arrival at the front (None: not happened yet) ------------
    def _since_arrival(self, moment: float | None) -> float | None:
        return None if moment is None else moment - self.arrival

    @property
    def queue_s(self) -> float | None:
        """Arrival to dispatch to a worker (to the end, for a request never dispatched)."""
        return self._since_arrival(self.dispatched_at or self.finished_at)

    @property
    def ttft_s(self) -> float | None:
        return self._since_arrival(self.first_token_at)

    @property
    def total_s(self) -> float | None:
        return self._since_arrival(self.finished_at)

    def chunk_from(self, index: int) -> Chunk:
        """Everything from token `index` on, as one chunk (final fields if finished)."""
        chunk = Chunk(
            self.request_id,
            index,
            self.token_ids[index:],
            "".join(self.text_deltas[index:]) + self.tail,
            logprobs=self.logprobs[index:],
        )
        if self.finished:
            chunk.finish_reason = self.finish_reason
            chunk.prompt_tokens = len(self.request.prompt_ids)
            chunk.cached_prompt_tokens = self.cached_prompt_tokens or 0
            chunk.queue_ms = (self.queue_s or 0.0) * 1000
            chunk.ttft_ms = (self.ttft_s or 0.0) * 1000  # 0: no token came
            chunk.total_ms = (self.total_s or 0.0) * 1000
        return chunk

    async def follow(self, from_index: int = 0) -> AsyncIterator[Chunk]:
        """Replay from `from_index`, then follow live until the request ends."""
        index = from_index
        while True:
            changed = self._changed
            if self.error is not None:
                raise self.error
            if index < len(self.token_ids) or self.finished:
                chunk = self.chunk_from(index)
                index += len(chunk.token_ids)
                yield chunk
                if chunk.finish_reason != FinishReason.NONE:  # not self.finished: it may
                    return  # have finished while we were suspended at the yield
            await changed.wait()


class DuplicateRequestId(ValueError):
    pass


class RequestRegistry:
    """Live requests by id and by channel handle, plus retained finished ones."""

    def __init__(
        self, retention_s: float, retention_count: int, retention_bytes: int = 256 << 20
    ) -> None:
        self.retention_s = retention_s
        self.retention_count = retention_count
        self.retention_bytes = retention_bytes  # retained text + token bytes (retained_size)
        self.retained_bytes = 0
        self.live: dict[str, RequestState] = {}
        self.by_handle: dict[int, RequestState] = {}
        self.retired: OrderedDict[str, RequestState] = OrderedDict()
        self._handles = itertools.count(1)

    def create(self, request: ValidatedRequest, text: IncrementalText) -> RequestState:
        self.expire()
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.live or request_id in self.retired:
            raise DuplicateRequestId(f"request_id {request_id!r} is already in use")
        state = RequestState(request_id, next(self._handles), request, text)
        self.live[request_id] = state
        self.by_handle[state.handle] = state
        return state

    def get(self, request_id: str) -> RequestState | None:
        return self.live.get(request_id) or self.retired.get(request_id)

    def discard(self, state: RequestState) -> None:
        """Forget a request that never got queued (e.g. the queue was full)."""
        self.live.pop(state.request_id, None)
        self.by_handle.pop(state.handle, None)

    def retire(self, state: RequestState) -> None:
        """Move a finished request to the bounded replay store."""
        self.discard(state)
        self.retired[state.request_id] = state
        self.retained_bytes += retained_size(state)
        self.expire()

    def expire(self) -> None:
        horizon = time.monotonic() - self.retention_s
        while self.retired and (
            len(self.retired) > self.retention_count
            or self.retained_bytes > self.retention_bytes
            or (next(iter(self.retired.values())).finished_at or 0) < horizon
        ):
            self.retained_bytes -= retained_size(self.retired.popitem(last=False)[1])


def retained_size(state: RequestState) -> int:
    """What a retained result holds: its text (UTF-8), 4 bytes per prompt or output token
    and 8 per logprob (the token's and each alternative's)."""
    text = sum(len(delta.encode()) for delta in state.text_deltas) + len(state.tail.encode())
    logprobs = sum(1 + len(lp.top) for lp in state.logprobs)
    return text + 4 * (len(state.request.prompt_ids) + len(state.token_ids)) + 8 * logprobs
