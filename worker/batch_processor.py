"""BatchProcessor: continuous (iteration-level) batching over a paged KV cache.

add_request(...)  -> queue a request (ValueError only if it can never run)
process_step()    =  schedule -> (draft) -> forward -> sample (, verify) -> update states -> compact
cancel(handle)    -> frees the slot and KV blocks at once
get_stats()       -> Status (the same record the worker sends the front)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from worker.backend import Backend, select_backend
from worker.block_manager import BlockManager
from worker.channel.messages import Status
from worker.channel.types import (
    MAX_TOP_LOGPROBS,
    EngineConfig,
    FinishReason,
    Priority,
    SamplingParams,
    TokenLogprob,
    TokenRecord,
)
from worker.checkpoint import Checkpoint, load_checkpoint
from worker.kv_cache import blocks_for, plan_kv_cache
from worker.model_runner import ModelRunner
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import Sequence
from worker.speculative import Verified
from worker.speculator import Speculator

log = logging.getLogger(__name__)


class BatchProcessor:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, backend: Backend) -> None:
        self.config = config
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.chat_template = checkpoint.chat_template
        context = checkpoint.config.max_position_embeddings
        self.max_seq_len = min(config.max_seq_len or context, context)
        self.layout = plan_kv_cache(checkpoint.config, config.kv_cache_mb, config.block_size)
        log.info("%s", self.layout.describe())
        self.runner = ModelRunner(checkpoint, self.layout, backend, config.batch_invariant)
        blocks = BlockManager(self.layout.num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(
            blocks,
            config.block_size,
            config.max_batch_size,
            config.prefill_token_budget,
        )
        self.total_tokens = 0
        self._by_handle: dict[int, Sequence] = {}
        self.speculator: Speculator | None = None
        if config.speculation:
            self.speculator = Speculator.from_config(
                config, checkpoint.config, self.layout, self.max_seq_len, backend
            )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig) -> BatchProcessor:
        backend = select_backend(config.device)
        return cls(load_checkpoint(model_dir, backend), config, backend)

    # -- requests -------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams, generated: list[int]) -> None:
        """Raise ValueError naming the field and the limit for a request that can never run.

        The front checks the same limits first (from Ready); this guards the engine itself.
        """
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt_token_ids must not be empty")
        bad = next((t for t in prompt_ids + generated if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside [0, {vocab})")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be > 0")
        top_limit = min(MAX_TOP_LOGPROBS, vocab)
        if not 0 <= params.top_logprobs <= top_limit:
            raise ValueError(f"top_logprobs must be in [0, {top_limit}]")
        if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
            raise ValueError("repetition_penalty must be finite and > 0")
        if len(generated) >= params.max_new_tokens:
            raise ValueError("generated tokens already reach max_new_tokens")
        if len(prompt_ids) + len(generated) >= self.max_seq_len:
            raise ValueError(
                f"prompt_token_ids: {len(prompt_ids)} tokens leave no room in the context "
                f"limit of {self.max_seq_len}"
            )
        longest = min(len(prompt_ids) + params.max_new_tokens, self.max_seq_len)
        if blocks_for(longest, self.config.block_size) > self.layout.num_blocks:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceed the KV cache "
                f"({self.layout.capacity_tokens} tokens)"
            )

    def add_request(
        self,
        handle: int,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: Priority = Priority.NORMAL,
        generated: list[int] | None = None,
    ) -> None:
        """Queue a request; it starts when a slot and its KV blocks are free.

        `generated` resumes a request begun elsewhere: those tokens count toward
        max_new_tokens and the sampling position, and are not emitted again.
        ValueError (naming the field and the limit) if it can never run.
        """
        if handle in self._by_handle:
            raise ValueError(f"request handle {handle} is already in use")
        generated = list(generated or [])
        self.validate(prompt_ids, params, generated)
        seq = Sequence(handle, list(prompt_ids), params, priority, generated=generated)
        self.scheduler.add(seq)
        self._by_handle[handle] = seq

    def cancel(self, handle: int) -> TokenRecord | None:
        """End a queued or running request; None if it is not here (already finished)."""
        seq = self._by_handle.pop(handle, None)
        if seq is None:
            return None
        seq.finish_reason = FinishReason.CANCELLED
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        cached = seq.cached_prompt_tokens
        return TokenRecord(
            handle, -1, seq.tokens_generated, FinishReason.CANCELLED, cached_prompt_tokens=cached
        )

    def has_work(self) -> bool:
        return bool(self._by_handle)

    # -- one engine step ------------------------------------------------------------
    def process_step(self) -> list[TokenRecord]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        started = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(batch, self.scheduler)
        sampled, next_tokens, logprobs, verified = self.runner.run(batch, self.speculator)
        if self.speculator is not None:
            self.speculator.observe_step(batch, time.perf_counter() - started)
        records = self.update_states(batch, sampled, next_tokens.tolist(), logprobs)
        for seq, outcome in verified.items():
            records += self.emit_verified(seq, len(batch.drafts[seq].tokens), outcome)
        self.compact()
        return records

    def update_states(
        self,
        batch: ScheduledBatch,
        sampled: list[Sequence],
        next_tokens: list[int],
        logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[TokenRecord]:
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, chunk in batch.prefills:
            seq.num_computed += chunk
        for seq in [*batch.decodes, *(seq for seq, _ in batch.prefills)]:
            self.scheduler.block_manager.cache_computed(seq)  # full blocks join the prefix cache
        records = []
        logprobs = logprobs or [None] * len(sampled)
        for seq, token, logprob in zip(sampled, next_tokens, logprobs, strict=True):
            seq.generated.append(token)
            seq.finish_reason = self.finish_reason(seq, token)
            index, cached = seq.tokens_generated - 1, seq.cached_prompt_tokens
            records.append(
                TokenRecord(seq.handle, token, index, seq.finish_reason, logprob, cached)
            )
        self.total_tokens += len(sampled)
        return records

    def emit_verified(self, seq: Sequence, drafted: int, outcome: Verified) -> list[TokenRecord]:
        """A verified decode's tokens (accepted drafts, then one more), one by one: each is
        checked for a stop id, EOS and the length limits, and nothing after the first
        finishing token is emitted. The K/V of rejected drafts is rolled back; the blocks
        the emitted tokens filled join the prefix cache (rejected drafts' never do)."""
        records = []
        for token, logprob in zip(outcome.tokens, outcome.logprobs, strict=True):
            seq.generated.append(token)
            seq.finish_reason = self.finish_reason(seq, token)
            index, cached = seq.tokens_generated - 1, seq.cached_prompt_tokens
            records.append(
                TokenRecord(seq.handle, token, index, seq.finish_reason, logprob, cached)
            )
            if not seq.active:
                break
        seq.num_computed = seq.current_length - 1  # the last token's K/V comes next step
        self.scheduler.release_lookahead(seq)
        self.scheduler.block_manager.cache_computed(seq)  # verified tokens' K/V only
        assert self.speculator is not None
        self.speculator.record(seq, drafted, accepted=len(outcome.tokens) - 1)
        self.total_tokens += len(records)
        return records

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason:
        params = seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in self.model_config.eos_token_ids:
            return FinishReason.EOS
        if seq.tokens_generated >= params.max_new_tokens or seq.current_length >= self.max_seq_len:
            return FinishReason.LENGTH
        return FinishReason.NONE

    def compact(self) -> None:
        """Free finished sequences' slots and KV blocks at once."""
        for seq in [s for s in self.scheduler.running if not s.active]:
            self.scheduler.remove(seq)
            del self._by_handle[seq.handle]
            if self.speculator is not None:
                self.speculator.release(seq)

    # -- introspection --------------------------------------------------------------
    def get_stats(self, adds_received: int = 0, add_tokens_received: int = 0) -> Status:
        """This engine's load, as the Status the worker reports after each step."""
        scheduler, blocks = self.scheduler, self.scheduler.block_manager
        return Status(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            max_batch_size=self.config.max_batch_size,
            kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks,
            kv_free_tokens=scheduler.free_kv_tokens(),
            total_tokens=self.total_tokens,
            preemptions=scheduler.num_preemptions,
            adds_received=adds_received,
            add_tokens_received=add_tokens_received,
            kv_blocks_cached=blocks.num_cached,
            prefix_cache_query_tokens=blocks.query_tokens,
            prefix_cache_hit_tokens=blocks.hit_tokens,
            draft_tokens=self.speculator.draft_tokens if self.speculator else 0,
            accepted_draft_tokens=self.speculator.accepted_tokens if self.speculator else 0,
        )


# -- the bare engine, run to completion (tests and engine benchmarks) ----------------
@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked
    cached_prompt_tokens: int = 0


def run_to_completion(
    processor: BatchProcessor,
    requests: Iterable[Request],
    on_records: Callable[[list[TokenRecord]], None] | None = None,
) -> dict[str, Completion]:
    """Queue every request, step until all have finished; results keyed by request_id.

    Token ids only: no detokenizer or stop strings (those are the front's,
    server/frontend.py, which `python -m worker.batch` runs).
    """
    by_handle: dict[int, Completion] = {}
    for handle, request in enumerate(requests):
        processor.add_request(handle, request.prompt_ids, request.params, request.priority)
        by_handle[handle] = Completion(request.request_id, len(request.prompt_ids))
    while processor.has_work():
        records = processor.process_step()
        for record in records:
            done = by_handle[record.handle]
            done.token_ids.append(record.token_id)
            done.finish_reason = record.finish_reason
            if record.logprob is not None:
                done.logprobs.append(record.logprob)
            done.cached_prompt_tokens = record.cached_prompt_tokens
        if on_records is not None:
            on_records(records)
    return {c.request_id: c for c in by_handle.values()}
