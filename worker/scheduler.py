"""Scheduler: which sequences run this step, and how many tokens each.

Policy, per step:
1. resume preempted sequences first, as blocks allow;
2. every decoding sequence runs (one token each); when one needs a new KV
   block and none is free, the lowest-priority, latest-arrived running
   sequence is preempted: its blocks go back to the pool and it waits to be
   recomputed (prompt + tokens generated so far), losing nothing;
3. prefill chunks fill the remaining per-step token budget, so one long
   prompt is split across steps instead of stalling everyone's decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.kv_cache import BlockAllocator, blocks_for
from worker.sequence import Sequence


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


def _rank(seq: Sequence) -> tuple[int, int]:
    """Sort key: higher priority first, then earlier arrival."""
    return (int(seq.priority), seq.arrival)


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, block_size: int, max_batch_size: int, prefill_budget: int
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.running: list[Sequence] = []
        self.preempted: deque[Sequence] = deque()
        self.num_preemptions = 0
        # Keep a few blocks back from admission so running decodes can grow without churn.
        self.watermark = max(1, allocator.num_blocks // 100)

    # -- admission ----------------------------------------------------------------
    def blocks_needed(self, seq: Sequence) -> int:
        return blocks_for(seq.current_length, self.block_size)

    def can_admit(self, seq: Sequence, reserve: int = 0) -> bool:
        return (
            len(self.running) < self.max_batch_size
            and self.allocator.num_free >= self.blocks_needed(seq) + reserve
        )

    def admit(self, seq: Sequence) -> bool:
        """Start seq if a slot and its blocks are free; preempted sequences go first."""
        reserve = self.watermark if self.running else 0  # an idle engine takes any fitting prompt
        if self.preempted or not self.can_admit(seq, reserve=reserve):
            return False
        self._start(seq)
        return True

    def _start(self, seq: Sequence) -> None:
        seq.block_table = self.allocator.allocate(self.blocks_needed(seq))
        seq.num_computed = 0
        self.running.append(seq)

    # -- release --------------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        """Give a sequence's blocks back and forget it (finished or cancelled)."""
        self.allocator.free(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)

    def _preempt(self, victim: Sequence) -> None:
        self.release(victim)
        victim.num_computed = 0
        self.num_preemptions += 1
        # Waiting order mirrors service order: priority, then arrival.
        position = sum(1 for s in self.preempted if _rank(s) < _rank(victim))
        self.preempted.insert(position, victim)

    # -- one step -------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        while self.preempted and self.can_admit(self.preempted[0]):
            self._start(self.preempted.popleft())

        batch = ScheduledBatch()
        for seq in sorted(self.running, key=_rank):
            if seq in self.running and seq.is_decoding and self._reserve_slot(seq):
                batch.decodes.append(seq)

        budget = self.prefill_budget
        for seq in sorted(self.running, key=_rank):
            if budget == 0:
                break
            if not seq.is_decoding and seq.num_pending > 0:
                chunk = min(seq.num_pending, budget)
                batch.prefills.append((seq, chunk))
                budget -= chunk
        return batch

    def _reserve_slot(self, seq: Sequence) -> bool:
        """Make room for the K/V of seq's pending token; False if seq itself was preempted."""
        while len(seq.block_table) * self.block_size <= seq.num_computed:
            if self.allocator.num_free == 0:
                victim = max(self.running, key=_rank)
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.block_table.extend(self.allocator.allocate(1))
        return True
