"""Scheduler: the worker's one admission queue, and which sequences run each step.

Two lists, as in nano-vllm: `waiting` (admitted by the engine, no KV yet;
ordered by Sequence.rank: preempted first, then priority, then arrival) and
`running` (holding KV blocks). Policy, per step:

1. start waiting sequences in order while a slot and their blocks are free
   (a few blocks are kept back while others run, so decodes can grow); the
   head blocks the rest, so a later or lower-priority request never jumps it.
   A sequence starts after its longest cached prefix (BlockManager);
2. every decoding sequence runs (one token each); when one needs a new KV
   block and none is free, the lowest-ranked running sequence is preempted:
   it lets go of its blocks and waits to be recomputed (prompt + tokens
   generated so far, much of it a prefix cache hit if its blocks are still
   cached), losing nothing;
3. prefill chunks fill the remaining per-step token budget, so one long
   prompt is split across steps instead of stalling everyone's decoding.
   Requests that share a prompt prefix and start together compute it once:
   a sequence whose next block an earlier chunk of the same step computes
   waits a step, and before its chunk a sequence takes over the blocks of
   its prefix that others computed since it started.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from worker.block_manager import BlockManager
from worker.kv_cache import blocks_for
from worker.sequence import Sequence
from worker.speculative import Draft


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)
    # Speculative decoding: draft tokens of some decodes, verified in this step's forward.
    drafts: dict[Sequence, Draft] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        drafted = sum(len(d.tokens) for d in self.drafts.values())
        return len(self.decodes) + drafted + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, block_size: int, max_batch_size: int, prefill_budget: int
    ) -> None:
        self.block_manager = block_manager
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.prefill_budget = prefill_budget
        self.waiting: list[Sequence] = []  # sorted by Sequence.rank
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a few blocks back from admission so running decodes can grow without churn.
        self.watermark = max(1, block_manager.num_blocks // 100)

    # -- the queue ------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.rank)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (finished or cancelled) and let go of its blocks."""
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    def blocks_needed(self, seq: Sequence) -> int:
        return blocks_for(seq.current_length, self.block_size)

    def free_kv_tokens(self) -> int:
        """KV tokens still free once every waiting sequence has its blocks.

        Cached blocks nobody holds count as free (they are evicted on demand); a
        waiting sequence counts all its blocks, as if it had no prefix cache hit.
        """
        free = self.block_manager.num_free - sum(self.blocks_needed(s) for s in self.waiting)
        return max(0, free) * self.block_size

    # -- one step -------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self._admit()
        batch = ScheduledBatch()
        for seq in sorted(self.running, key=lambda s: s.rank):
            if seq in self.running and seq.is_decoding and self._reserve_slot(seq):
                batch.decodes.append(seq)

        budget, blocks = self.prefill_budget, self.block_manager
        computing: set[bytes] = set()  # hashes of the blocks this step's chunks fill
        for seq in sorted(self.running, key=lambda s: s.rank):
            if budget == 0:
                break
            if not seq.is_decoding and seq.num_pending > 0:
                blocks.take_cached_blocks(seq)
                if blocks.next_block_hash(seq) in computing:
                    continue  # an earlier chunk computes it now: taken over next step
                chunk = min(seq.num_pending, budget)
                batch.prefills.append((seq, chunk))
                computing.update(blocks.hashes_completed(seq, chunk))
                budget -= chunk
        return batch

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            reserve = self.watermark if self.running else 0  # an idle engine takes any prompt
            if not self.block_manager.allocate_sequence(seq, reserve):
                return
            self.waiting.pop(0)
            seq.preempted = False
            self.running.append(seq)

    def _reserve_slot(self, seq: Sequence) -> bool:
        """Make room for the K/V of seq's pending token; False if seq itself was preempted."""
        while len(seq.block_table) * self.block_size <= seq.num_computed:
            if self.block_manager.num_free == 0:
                victim = max(self.running, key=lambda s: s.rank)
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.block_table.extend(self.block_manager.allocate(1))
        return True

    # -- speculative decoding: KV slots for draft tokens -------------------------------
    def reserve_lookahead(self, seq: Sequence, num_tokens: int) -> int:
        """KV slots for up to num_tokens draft tokens after seq's pending one; how many fit.

        Only free (or cached, evicted) blocks are taken, each fresh and held by seq alone:
        drafts never preempt anyone, they shrink instead.
        """
        have = len(seq.block_table)
        need = blocks_for(seq.num_computed + 1 + num_tokens, self.block_size) - have
        take = min(max(need, 0), self.block_manager.num_free)
        if take:
            seq.block_table.extend(self.block_manager.allocate(take))
        return min(num_tokens, (have + take) * self.block_size - seq.num_computed - 1)

    def release_lookahead(self, seq: Sequence) -> None:
        """After a verify: give back the blocks that held only rejected drafts' K/V.

        Those blocks lie past seq's computed tokens, so they were never named in the prefix
        cache nor shared: they go straight back to the free pool.
        """
        keep = blocks_for(seq.num_computed, self.block_size)
        if len(seq.block_table) > keep:
            rejected = seq.block_table[keep:]
            blocks = self.block_manager
            assert all(blocks.ref_count[b] == 1 and blocks.hash_of[b] is None for b in rejected)
            blocks.free(rejected)
            del seq.block_table[keep:]

    def _preempt(self, victim: Sequence) -> None:
        self.remove(victim)
        victim.num_computed = 0
        victim.preempted = True
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)
