"""Scheduler with a real BlockManager and hand-made Sequences; no model.

A "step" here does what BatchProcessor.update_states does after the forward pass:
decodes and prefill chunks advance `num_computed`, their full blocks are offered
to the prefix cache, and every sequence whose K/V is now complete (a decode, or a
chunk that ends its tokens) gets one new token. These tests run with prefix
caching off (every prompt here starts 1, 2, 3...); tests/test_prefix_cache.py has
it on.
"""

from __future__ import annotations

import random

import pytest

from worker.block_manager import BlockManager
from worker.channel.types import Priority, SamplingParams
from worker.kv_cache import blocks_for
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import Sequence

BS = 4  # tokens per block: small, so a few tokens cross block boundaries
HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


def make(
    num_blocks: int = 64, max_batch_size: int = 8, budget: int = 64, prefix_caching: bool = False
) -> tuple[Scheduler, BlockManager]:
    blocks = BlockManager(num_blocks, BS, prefix_caching)
    return Scheduler(blocks, BS, max_batch_size, budget), blocks


def seq(handle: int, prompt_len: int, priority: Priority = NORMAL) -> Sequence:
    """A new sequence; arrival order is creation order."""
    return Sequence(handle, list(range(1, prompt_len + 1)), SamplingParams(), priority)


def handles(seqs: list[Sequence]) -> list[int]:
    return [s.handle for s in seqs]


def step(scheduler: Scheduler) -> ScheduledBatch:
    batch = scheduler.schedule()
    for s in batch.decodes:
        s.num_computed += 1
        s.generated.append(7)
    for s, chunk in batch.prefills:
        s.num_computed += chunk
    for s in [*batch.decodes, *(s for s, _ in batch.prefills)]:
        scheduler.block_manager.cache_computed(s)
    for s, _ in batch.prefills:
        if s.num_computed == s.current_length:
            s.generated.append(7)
    return batch


def running_with(
    scheduler: Scheduler, s: Sequence, generated: int, blocks: int | None = None
) -> Sequence:
    """Put `s` straight into `running` as a decoding sequence that generated `generated`
    tokens, holding `blocks` blocks (default: just enough for its computed tokens)."""
    s.generated = [7] * generated
    s.num_computed = s.current_length - 1
    needed = blocks if blocks is not None else blocks_for(s.num_computed, BS)
    s.block_table = scheduler.block_manager.allocate(needed)
    scheduler.running.append(s)
    return s


def held_blocks(scheduler: Scheduler) -> list[int]:
    return [b for s in scheduler.running for b in s.block_table]


def check_blocks(scheduler: Scheduler) -> None:
    """No block is lost or counted wrong: each block's reference count is the number of
    running sequences holding it (no sequence holds one twice); a block nobody holds is
    free or cached, never both; held + free (incl. cached) == total; waiting sequences
    hold none; the hash table and the blocks' hashes agree."""
    blocks = scheduler.block_manager
    held = held_blocks(scheduler)
    for s in scheduler.running:
        assert len(s.block_table) == len(set(s.block_table))
    counts = {b: held.count(b) for b in set(held)}
    assert [blocks.ref_count[b] for b in range(blocks.num_blocks)] == [
        counts.get(b, 0) for b in range(blocks.num_blocks)
    ]
    free, cached = set(blocks._free), set(blocks._evictable)
    assert len(free) == len(blocks._free) and not free & cached and not free & counts.keys()
    assert not cached & counts.keys()
    assert len(counts) + blocks.num_free == blocks.num_blocks
    assert blocks.num_used == len(counts)
    assert all(blocks.hash_of[b] is None for b in free)
    assert all(blocks.hash_of[b] is not None for b in cached)
    assert {h: b for b, h in enumerate(blocks.hash_of) if h is not None} == blocks.cached
    assert all(not s.block_table for s in scheduler.waiting)


# -- admission -------------------------------------------------------------------------------
def test_admission_order_is_preempted_then_priority_then_arrival() -> None:
    scheduler, _ = make()
    a, b, c, d = seq(0, 3), seq(1, 3, LOW), seq(2, 3, HIGH), seq(3, 3)
    e = seq(4, 3, LOW)
    e.preempted = True  # the last to arrive, lowest class: still first
    for s in (a, b, c, d, e):
        scheduler.add(s)
    assert handles(scheduler.waiting) == [4, 2, 0, 3, 1]
    scheduler.schedule()
    assert handles(scheduler.running) == [4, 2, 0, 3, 1]
    assert scheduler.waiting == []
    check_blocks(scheduler)


def test_the_head_of_the_queue_is_not_jumped() -> None:
    scheduler, _ = make(num_blocks=8)
    big = seq(0, 16)  # 4 blocks: admitted into the idle engine
    scheduler.add(big)
    step(scheduler)
    assert handles(scheduler.running) == [0]
    head = seq(1, 16)  # 4 blocks: 4 are free, but one is kept back while others run
    small = seq(2, 2)  # 1 block: would fit, but arrived after the head
    scheduler.add(head)
    scheduler.add(small)
    step(scheduler)
    assert handles(scheduler.running) == [0]
    assert handles(scheduler.waiting) == [1, 2]
    urgent = seq(3, 2, HIGH)  # a higher class goes before the head
    scheduler.add(urgent)
    step(scheduler)
    assert handles(scheduler.running) == [0, 3]
    assert handles(scheduler.waiting) == [1, 2]
    scheduler.remove(big)  # finished: its 4 blocks come back, and the head goes in first
    step(scheduler)
    assert handles(scheduler.running) == [3, 1, 2]
    check_blocks(scheduler)


def test_no_more_running_sequences_than_slots() -> None:
    scheduler, _ = make(max_batch_size=2)
    for h in range(3):
        scheduler.add(seq(h, 3))
    step(scheduler)
    assert handles(scheduler.running) == [0, 1] and handles(scheduler.waiting) == [2]
    for _ in range(3):  # running sequences keep their slots
        step(scheduler)
        assert handles(scheduler.running) == [0, 1]
    scheduler.remove(scheduler.running[0])
    step(scheduler)
    assert handles(scheduler.running) == [1, 2] and scheduler.waiting == []


def test_watermark_is_kept_back_only_while_others_run() -> None:
    assert make(num_blocks=300)[0].watermark == 3  # 1 % of the pool
    assert make(num_blocks=50)[0].watermark == 1  # at least one block
    scheduler, blocks = make(num_blocks=8)
    whole = seq(0, 8 * BS)  # every block: an idle engine takes it
    scheduler.add(whole)
    scheduler.schedule()
    assert handles(scheduler.running) == [0] and blocks.num_free == 0
    scheduler.remove(whole)

    scheduler.add(seq(1, 2))  # 1 block, 7 left
    scheduler.schedule()
    too_big = seq(2, 7 * BS)  # 7 blocks: would leave nothing for the running one to grow
    scheduler.add(too_big)
    scheduler.schedule()
    assert handles(scheduler.waiting) == [2]
    scheduler.remove(too_big)
    fits = seq(3, 6 * BS)  # 6 blocks: one stays free
    scheduler.add(fits)
    scheduler.schedule()
    assert handles(scheduler.running) == [1, 3] and blocks.num_free == 1
    check_blocks(scheduler)


def test_free_kv_tokens_counts_what_waiting_sequences_will_take() -> None:
    scheduler, blocks = make(num_blocks=8)
    assert scheduler.free_kv_tokens() == 8 * BS
    scheduler.add(seq(0, 2 * BS))  # 2 blocks
    assert scheduler.free_kv_tokens() == 6 * BS  # waiting: counted already
    scheduler.schedule()
    assert blocks.num_free == 6 and scheduler.free_kv_tokens() == 6 * BS  # now held
    scheduler.add(seq(1, 2 * BS + 1))  # 3 blocks
    assert scheduler.free_kv_tokens() == 3 * BS
    scheduler.add(seq(2, 5 * BS))  # 5 more than are free: none left, not negative
    assert scheduler.free_kv_tokens() == 0


# -- a step: decodes, their blocks, preemption, prefill chunks ---------------------------------
def test_decodes_grow_their_block_table_one_block_at_a_time() -> None:
    scheduler, blocks = make()
    s = seq(0, BS)  # fills its one block exactly
    scheduler.add(s)
    batch = step(scheduler)
    assert batch.prefills == [(s, BS)] and batch.decodes == []
    assert len(s.block_table) == 1 and s.generated == [7]
    batch = step(scheduler)  # the K/V of token BS goes into a new block
    assert batch.decodes == [s] and batch.prefills == []
    assert len(s.block_table) == 2 and blocks.num_used == 2
    for _ in range(BS - 1):  # the rest of that block
        step(scheduler)
        assert len(s.block_table) == 2
    step(scheduler)
    assert len(s.block_table) == 3 and blocks.num_used == 3
    assert len(s.block_table) * BS > s.num_computed - 1  # every computed token has a slot
    check_blocks(scheduler)


def test_out_of_blocks_preempts_the_lowest_ranked_running_sequence() -> None:
    scheduler, blocks = make(num_blocks=3)
    grows = running_with(scheduler, seq(0, 4), generated=1)  # 4 tokens computed: needs a block
    victim = running_with(scheduler, seq(1, 2, LOW), generated=1)  # a lower class
    later = running_with(scheduler, seq(2, 2), generated=1)  # arrived last, but NORMAL
    assert blocks.num_free == 0
    batch = scheduler.schedule()
    assert batch.decodes == [grows, later]
    assert len(grows.block_table) == 2
    assert handles(scheduler.running) == [0, 2] and handles(scheduler.waiting) == [1]
    assert victim.preempted and victim.num_computed == 0 and victim.block_table == []
    assert victim.generated == [7]  # nothing lost: it is recomputed, prompt and tokens
    assert scheduler.num_preemptions == 1
    check_blocks(scheduler)

    scheduler.add(seq(3, 1, HIGH))  # a new request, even a HIGH one, waits behind it
    assert handles(scheduler.waiting) == [1, 3]
    scheduler.remove(later)  # both finish: the victim is readmitted first
    scheduler.remove(grows)
    batch = scheduler.schedule()
    assert handles(scheduler.running) == [1, 3]
    assert (victim, victim.current_length) in batch.prefills  # recomputed in one chunk
    check_blocks(scheduler)


def test_a_sequence_that_is_itself_the_lowest_ranked_preempts_itself() -> None:
    scheduler, blocks = make(num_blocks=2)
    keeps = running_with(scheduler, seq(0, 2), generated=1)  # 2 of 4 slots used: no new block
    needs = running_with(scheduler, seq(1, 4), generated=1)  # 4 computed: needs a 2nd block
    assert blocks.num_free == 0
    batch = scheduler.schedule()
    assert batch.decodes == [keeps] and batch.prefills == []
    assert handles(scheduler.running) == [0] and handles(scheduler.waiting) == [1]
    assert needs.preempted and needs.block_table == [] and scheduler.num_preemptions == 1
    assert blocks.num_free == 1
    check_blocks(scheduler)


def test_a_readmitted_sequence_is_preempted_by_its_class_again() -> None:
    scheduler, _ = make(num_blocks=4)
    high = running_with(scheduler, seq(0, 4, HIGH), generated=1)  # needs a block next step
    low = running_with(scheduler, seq(1, 2, LOW), generated=1, blocks=3)  # holds the rest
    step(scheduler)
    assert low.preempted and handles(scheduler.waiting) == [1]  # the lower class gave way
    for _ in range(8):  # low is readmitted and recomputed; both decode until blocks run out
        step(scheduler)
        if scheduler.num_preemptions == 2:
            break
    assert scheduler.num_preemptions == 2
    assert not high.preempted  # the HIGH sequence must never give way to a LOW one


def test_prefill_is_chunked_under_the_token_budget_besides_the_decodes() -> None:
    scheduler, _ = make(budget=8)
    decoding = seq(0, 2)
    scheduler.add(decoding)
    step(scheduler)  # now decoding
    long, short = seq(1, 20), seq(2, 5)
    scheduler.add(long)
    scheduler.add(short)
    chunks = []
    for _ in range(4):
        batch = step(scheduler)
        assert batch.decodes[0] is decoding  # one token every step, outside the budget
        chunks.append([(s.handle, n) for s, n in batch.prefills])
        assert sum(n for _, n in batch.prefills) <= 8
    # The last step has no chunk: a prompt with one token left runs it as a decode row.
    assert chunks == [[(1, 8)], [(1, 8)], [(1, 4), (2, 4)], []]
    assert handles(batch.decodes) == [0, 1, 2] and batch.num_tokens == 3
    assert long.generated == [7, 7] and short.generated == [7]  # sampled once their prompt ended
    check_blocks(scheduler)


def test_remove_a_waiting_or_a_running_sequence() -> None:
    scheduler, blocks = make(max_batch_size=1)
    first, second = seq(0, 6), seq(1, 3)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler)
    assert handles(scheduler.running) == [0] and blocks.num_used == 2
    scheduler.remove(second)  # waiting: holds nothing
    assert scheduler.waiting == [] and blocks.num_used == 2
    scheduler.remove(first)  # running: its blocks and its slot come back at once
    assert scheduler.running == [] and first.block_table == []
    assert blocks.num_free == blocks.num_blocks
    with pytest.raises(ValueError):
        scheduler.remove(first)  # gone from both lists
    assert scheduler.schedule().empty


@pytest.mark.parametrize("seed", range(6))
def test_blocks_never_leak_under_random_load(seed: int) -> None:
    """Many sequences through a tight pool: admissions, growth, preemptions, cancels."""
    rng = random.Random(seed)
    scheduler, blocks = make(num_blocks=24, max_batch_size=6, budget=10)
    wanted: dict[int, int] = {}  # handle -> tokens to generate
    live: list[Sequence] = []
    for h in range(40):
        s = seq(h, rng.randint(1, 14), rng.choice([HIGH, NORMAL, LOW]))
        wanted[h] = rng.randint(1, 20)
        scheduler.add(s)
        live.append(s)
    steps = 0
    while live:
        steps += 1
        assert steps < 5000, "no progress"
        batch = step(scheduler)
        assert batch.num_tokens <= 6 + 10 and not batch.empty
        for s in batch.decodes:  # each decode's new K/V has its slot
            assert len(s.block_table) * BS >= s.num_computed
        for s, n in batch.prefills:  # each chunk's K/V fits the sequence's table
            assert blocks_for(s.num_computed, BS) <= len(s.block_table) and n > 0
        for s in list(live):
            if s.generated and len(s.generated) >= wanted[s.handle]:
                scheduler.remove(s)  # finished
                live.remove(s)
            elif rng.random() < 0.01:
                scheduler.remove(s)  # cancelled, running or waiting
                live.remove(s)
        check_blocks(scheduler)
    assert scheduler.running == [] and scheduler.waiting == []
    assert blocks.num_free == blocks.num_blocks and blocks.num_used == 0
    assert scheduler.num_preemptions > 0  # the pool was tight enough to matter
