"""Plain dataclasses returned by the client; protobuf never leaves this package.

Converting at the edge keeps callers free of generated code: a `Chunk` compares, prints and
serialises (`dataclasses.asdict`) like any other value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shoal.v1 import inference_pb2 as pb


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, found in the worker's prefix cache


@dataclass(frozen=True, slots=True)
class Timing:
    """Latencies in milliseconds, measured by the server."""

    queue_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability (natural log) and the most likely alternatives,
    most likely first (as many as the request's top_logprobs); see inference.proto."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """{"token_id", "logprob", "top": [{"token_id", "logprob"}]}: the JSONL form."""
        return dataclasses.asdict(self) | {"top": [dataclasses.asdict(t) for t in self.top]}


@dataclass(frozen=True, slots=True)
class Chunk:
    """New tokens of one request. finish_reason ("LENGTH", "STOP", "EOS", "CANCELLED") is
    None while the request runs; usage and timing are set on the last chunk only."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole request: the concatenation of its chunks."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    timing: Timing | None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerStats:
    worker: int  # -1 for the totals
    active_sequences: int
    total_tokens: int
    utilization: float
    queue_length: int
    kv_blocks_used: int
    kv_blocks_total: int
    alive: bool
    draft_tokens: int = 0  # speculative decoding: draft tokens verified, accepted, their ratio
    accepted_draft_tokens: int = 0
    draft_acceptance_rate: float = 0.0
    kv_blocks_cached: int = 0  # held by no sequence, kept for prefix cache hits
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_hit_rate: float = 0.0  # hit / query tokens since the worker started


@dataclass(frozen=True, slots=True)
class Stats:
    workers: tuple[WorkerStats, ...]
    total: WorkerStats  # queue_length: requests waiting inside the workers (sum of the rows)
    pending_queue_length: int = 0  # requests in the server's queue, not yet on a worker

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    device: str
    max_new_tokens_limit: int
    kv_capacity_tokens: int = 0
    has_chat_template: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FINISH_PREFIX = "FINISH_REASON_"


def finish_reason_name(value: int) -> str | None:
    """Wire enum -> "LENGTH" etc.; UNSPECIFIED (still running) -> None."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return pb.FinishReason.Name(value).removeprefix(_FINISH_PREFIX)
    except ValueError:  # a newer server's reason this client doesn't know
        return str(value)


def chunk_from_pb(msg: pb.GenerateChunk) -> Chunk:
    usage = timing = None
    # Presence, not zero values, marks the last chunk: a request may finish with 0 tokens.
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    if msg.HasField("timing"):
        timing = Timing(msg.timing.queue_ms, msg.timing.ttft_ms, msg.timing.total_ms)
    return Chunk(
        request_id=msg.request_id,
        index=msg.index,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=finish_reason_name(msg.finish_reason),
        usage=usage,
        timing=timing,
        logprobs=tuple(
            TokenLogprob(
                lp.token_id, lp.logprob, tuple(TopLogprob(t.token_id, t.logprob) for t in lp.top)
            )
            for lp in msg.logprobs
        ),
    )


def worker_stats_from_pb(msg: pb.WorkerStats) -> WorkerStats:
    return WorkerStats(
        worker=msg.worker,
        active_sequences=msg.active_sequences,
        total_tokens=msg.total_tokens,
        utilization=msg.utilization,
        queue_length=msg.queue_length,
        kv_blocks_used=msg.kv_blocks_used,
        kv_blocks_total=msg.kv_blocks_total,
        alive=msg.alive,
        draft_tokens=msg.draft_tokens,
        accepted_draft_tokens=msg.accepted_draft_tokens,
        draft_acceptance_rate=msg.draft_acceptance_rate,
        kv_blocks_cached=msg.kv_blocks_cached,
        prefix_cache_query_tokens=msg.prefix_cache_query_tokens,
        prefix_cache_hit_tokens=msg.prefix_cache_hit_tokens,
        prefix_cache_hit_rate=msg.prefix_cache_hit_rate,
    )


def stats_from_pb(msg: pb.Stats) -> Stats:
    return Stats(
        workers=tuple(worker_stats_from_pb(w) for w in msg.workers),
        total=worker_stats_from_pb(msg.total),
        pending_queue_length=msg.pending_queue_length,
    )


def model_info_from_pb(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=msg.name,
        architecture=msg.architecture,
        vocab_size=msg.vocab_size,
        max_context=msg.max_context,
        eos_token_ids=tuple(msg.eos_token_ids),
        device=msg.device,
        max_new_tokens_limit=msg.max_new_tokens_limit,
        kv_capacity_tokens=msg.kv_capacity_tokens,
        has_chat_template=msg.has_chat_template,
    )


class CompletionBuilder:
    """Accumulates chunks (sync or async) into one Completion."""

    def __init__(self) -> None:
        self.request_id = ""
        self._text: list[str] = []
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._last: Chunk | None = None
        self.usage: Usage | None = None
        self.timing: Timing | None = None

    def add(self, chunk: Chunk) -> None:
        self.request_id = self.request_id or chunk.request_id
        self._text.append(chunk.text)
        self._tokens.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        self._last = chunk
        self.usage = chunk.usage or self.usage
        self.timing = chunk.timing or self.timing

    def build(self) -> Completion:
        return Completion(
            request_id=self.request_id,
            text="".join(self._text),
            token_ids=tuple(self._tokens),
            finish_reason=self._last.finish_reason if self._last else None,
            usage=self.usage,
            timing=self.timing,
            logprobs=tuple(self._logprobs),
        )
