"""Sequence: one request's life inside the engine (no arrays, no gRPC)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from worker.channel.types import FinishReason, Priority, SamplingParams

_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request inside a BatchProcessor, named by the front's integer `handle`.

    `tokens` = prompt + generated so far. `num_computed` tokens have K/V in the
    cache; the rest still have to go through the model (a prefill chunk, the
    last sampled token for a decode, or everything again after preemption).
    """

    handle: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    generated: list[int] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrival))
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    # Prefix caching (worker/block_manager.py): the chained hashes of the full blocks of
    # `tokens` as far as looked at, how many leading blocks of block_table were offered to
    # the cache, and how many prompt tokens the first prefill took from the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0
    cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    preempted: bool = False  # waiting to be recomputed: goes before every new request
    finish_reason: FinishReason = FinishReason.NONE

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def current_length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def tokens_generated(self) -> int:
        return len(self.generated)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are not yet cached."""
        return self.current_length - self.num_computed

    @property
    def active(self) -> bool:
        return self.finish_reason == FinishReason.NONE

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and self.num_computed > 0

    @property
    def rank(self) -> tuple[bool, int, int]:
        """Service order: preempted first, then higher priority, then earlier arrival."""
        return (not self.preempted, int(self.priority), self.arrival)
