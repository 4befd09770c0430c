"""BatchProcessor: continuous (iteration-level) batching over a paged KV cache.

add_request(...)  -> False when slots or KV blocks are short
process_step()    =  schedule -> forward -> sample -> update states -> compact
cancel(id)        -> frees the slot and KV blocks at once
get_stats()       -> EngineStats
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from worker.backend import Backend, select_backend
from worker.checkpoint import Checkpoint, load_checkpoint
from worker.engine_config import EngineConfig
from worker.kv_cache import blocks_for, plan_kv_cache
from worker.model_runner import ModelRunner
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import FinishReason, Priority, SamplingParams, Sequence, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    active_sequences: int
    total_tokens: int  # tokens generated since start
    utilization: float  # active_sequences / max_batch_size
    queue_length: int  # preempted sequences waiting to resume
    kv_blocks_used: int
    kv_blocks_total: int
    free_slots: int
    preemptions: int


class BatchProcessor:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, backend: Backend) -> None:
        self.config = config
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.max_seq_len = min(
            config.max_seq_len or checkpoint.config.max_position_embeddings,
            checkpoint.config.max_position_embeddings,
        )
        self.layout = plan_kv_cache(checkpoint.config, config.kv_cache_mb, config.block_size)
        log.info("%s", self.layout.describe())
        self.runner = ModelRunner(checkpoint, self.layout, backend)
        self.scheduler = Scheduler(
            self.runner.cache.allocator,
            config.block_size,
            config.max_batch_size,
            config.prefill_token_budget,
        )
        self.total_tokens = 0
        self._by_id: dict[str, Sequence] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig) -> BatchProcessor:
        backend = select_backend(config.device)
        return cls(load_checkpoint(model_dir, backend), config, backend)

    # -- requests -------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams, generated: list[int]) -> None:
        """Raise ValueError naming the field and the limit for a request that can never run."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt_token_ids must not be empty")
        bad = next((t for t in prompt_ids + generated if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside [0, {vocab})")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be > 0")
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
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: Priority = Priority.NORMAL,
        generated: list[int] | None = None,
    ) -> bool:
        """Start a request now, or return False when slots or KV blocks are short.

        `generated` resumes a request elsewhere: those tokens count toward
        max_new_tokens and the sampling position, and are not emitted again.
        """
        if request_id in self._by_id:
            raise ValueError(f"request_id {request_id!r} is already running")
        generated = list(generated or [])
        self.validate(prompt_ids, params, generated)
        seq = Sequence(request_id, list(prompt_ids), params, priority, generated=generated)
        if not self.scheduler.admit(seq):
            return False
        self._by_id[request_id] = seq
        return True

    def cancel(self, request_id: str) -> TokenEvent | None:
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        seq.finish_reason = FinishReason.CANCELLED
        self.scheduler.release(seq)
        return TokenEvent(request_id, -1, seq.tokens_generated, FinishReason.CANCELLED)

    def has_work(self) -> bool:
        return bool(self._by_id)

    # -- one engine step ------------------------------------------------------------
    def process_step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        sampled, next_tokens = self.runner.run(batch)
        events = self.update_states(batch, sampled, next_tokens.tolist())
        self.compact()
        return events

    def update_states(
        self, batch: ScheduledBatch, sampled: list[Sequence], next_tokens: list[int]
    ) -> list[TokenEvent]:
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, chunk in batch.prefills:
            seq.num_computed += chunk
        events = []
        for seq, token in zip(sampled, next_tokens, strict=True):
            seq.generated.append(token)
            seq.finish_reason = self.finish_reason(seq, token)
            events.append(
                TokenEvent(seq.request_id, token, seq.tokens_generated - 1, seq.finish_reason)
            )
        self.total_tokens += len(sampled)
        return events

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
            self.scheduler.release(seq)
            del self._by_id[seq.request_id]

    # -- introspection --------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        running = len(self.scheduler.running)
        allocator = self.scheduler.allocator
        return EngineStats(
            active_sequences=running,
            total_tokens=self.total_tokens,
            utilization=running / self.config.max_batch_size,
            queue_length=len(self.scheduler.preempted),
            kv_blocks_used=allocator.num_used,
            kv_blocks_total=allocator.num_blocks,
            free_slots=self.config.max_batch_size - running,
            preemptions=self.scheduler.num_preemptions,
        )
