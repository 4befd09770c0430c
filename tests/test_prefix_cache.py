"""Automatic prefix caching: BlockManager's hashes, sharing and LRU eviction, the scheduler
under random load (hypothesis), and the engine's tokens with and without the cache.

The random-load test keeps a shadow of the KV pool: each slot records which token prefix
its K/V were computed from. Every step checks that nothing is ever written into a shared
or cached block, and that every computed position of every running sequence holds the
K/V of exactly its own prefix - so a wrong hit, a missed reference or an early eviction
shows up as wrong content, not only as a wrong count.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.block_manager import ROOT_HASH, BlockManager, block_hash
from worker.channel.types import FinishReason, Priority, SamplingParams
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import Sequence

BS = 4


def seq(handle: int, tokens: list[int], priority: Priority = Priority.NORMAL) -> Sequence:
    return Sequence(handle, list(tokens), SamplingParams(), priority)


def compute(blocks: BlockManager, s: Sequence, n: int) -> None:
    """What a step does for s: n more tokens' K/V written, full blocks offered to the cache."""
    s.num_computed += n
    blocks.cache_computed(s)


def check_accounting(blocks: BlockManager, holders: list[Sequence]) -> None:
    """Each block's ref count is the number of `holders` whose table has it; a block nobody
    holds is free (no hash) or cached (a hash), never both; the hash table agrees."""
    counts = [0] * blocks.num_blocks
    for s in holders:
        assert len(set(s.block_table)) == len(s.block_table)
        for b in s.block_table:
            counts[b] += 1
    assert blocks.ref_count == counts
    free, cached = list(blocks._free), list(blocks._evictable)
    assert len(set(free)) == len(free) and not set(free) & set(cached)
    assert all(counts[b] == 0 and blocks.hash_of[b] is None for b in free)
    assert all(counts[b] == 0 and blocks.hash_of[b] is not None for b in cached)
    assert sum(c > 0 for c in counts) + blocks.num_free == blocks.num_blocks
    assert {h: b for b, h in enumerate(blocks.hash_of) if h is not None} == blocks.cached


# -- hashing -----------------------------------------------------------------------------------
def test_block_hash_is_chained_over_the_prefix_and_the_extra_key() -> None:
    a = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert a == block_hash(ROOT_HASH, [1, 2, 3, 4]) and len(a) == 32
    assert a != block_hash(ROOT_HASH, [1, 2, 3, 5])
    # The same tokens after another prefix are another block: K/V depend on the prefix.
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(
        block_hash(ROOT_HASH, [0, 2, 3, 4]), [5, 6, 7, 8]
    )
    assert block_hash(ROOT_HASH, [1, 2, 3, 4], extra=b"lora-1") != a  # the hook for e.g. LoRA
    assert block_hash(ROOT_HASH, [1, 2, 3, 4], extra=b"lora-1") != block_hash(
        ROOT_HASH, [1, 2, 3, 4], extra=b"lora-2"
    )


# -- BlockManager: hits, sharing, eviction -------------------------------------------------------
def test_a_second_sequence_starts_after_the_cached_full_blocks() -> None:
    blocks = BlockManager(16, BS)
    first = seq(0, list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    assert blocks.allocate_sequence(first)
    assert first.num_computed == 0 and first.cached_prompt_tokens == 0
    compute(blocks, first, 10)
    assert len(blocks.cached) == 2  # the partial third block is not named

    second = seq(1, [*range(1, 10), 99, 98])  # shares 9 tokens: 2 full blocks
    assert blocks.allocate_sequence(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed == 8 and second.cached_prompt_tokens == 8
    assert [blocks.ref_count[b] for b in first.block_table] == [2, 2, 1]
    assert (blocks.query_tokens, blocks.hit_tokens) == (10 + 11, 8)
    check_accounting(blocks, [first, second])

    other = seq(2, [7, *range(2, 11)])  # differs in the first token: nothing shared
    assert blocks.allocate_sequence(other) and other.num_computed == 0
    check_accounting(blocks, [first, second, other])


@pytest.mark.parametrize("length", [8, 9, 11, 12])
def test_a_fully_cached_prompt_still_computes_its_last_token(length: int) -> None:
    """Block-aligned or not, the last token is computed (its logits are needed): a prompt
    cached to its end takes its last block fresh, so no shared block is ever written."""
    blocks = BlockManager(16, BS)
    first = seq(0, list(range(1, length + 1)))
    blocks.allocate_sequence(first)
    compute(blocks, first, length)
    again = seq(1, list(range(1, length + 1)))
    assert blocks.allocate_sequence(again)
    assert again.num_computed == (length - 1) // BS * BS  # 4, 8, 8, 8
    assert 1 <= again.num_pending <= BS
    shared = again.num_computed // BS
    assert again.block_table[:shared] == first.block_table[:shared]
    assert not set(again.block_table[shared:]) & set(first.block_table)
    check_accounting(blocks, [first, again])


def test_ended_sequences_leave_their_blocks_cached_until_the_pool_needs_them() -> None:
    blocks = BlockManager(6, BS)
    a = seq(0, list(range(1, 13)))  # 3 full blocks
    blocks.allocate_sequence(a)
    compute(blocks, a, 12)
    blocks.free(a.block_table)
    assert blocks.num_free == 6 and blocks.num_cached == 3 and blocks.num_used == 0
    check_accounting(blocks, [])

    b = seq(1, list(range(50, 58)))  # 2 blocks: taken from the 3 never-named free ones
    blocks.allocate_sequence(b)
    assert not set(b.block_table) & set(a.block_table) and blocks.num_cached == 3
    c = seq(2, list(range(60, 72)))  # 3 blocks: 1 free + the 2 least recently used cached
    blocks.allocate_sequence(c)
    # a's table was let go of from its end: its last blocks are evicted first.
    assert set(c.block_table) >= {a.block_table[2], a.block_table[1]}
    assert blocks.num_cached == 1 and blocks.hash_of[a.block_table[0]] is not None
    check_accounting(blocks, [b, c])

    again = seq(3, list(range(1, 13)))
    blocks.free(b.block_table)
    assert blocks.allocate_sequence(again)
    assert again.num_computed == BS and again.block_table[0] == a.block_table[0]  # the survivor
    check_accounting(blocks, [c, again])


def test_a_hit_is_moved_to_the_recent_end_of_the_lru() -> None:
    blocks = BlockManager(4, BS)
    old, new = seq(0, [1, 2, 3, 4, 5]), seq(1, [9, 9, 9, 9, 9])
    for s in (old, new):
        blocks.allocate_sequence(s)
        compute(blocks, s, 5)
    blocks.free(old.block_table)
    blocks.free(new.block_table)
    reuse = seq(2, [1, 2, 3, 4, 6])  # hits old's block: it is held again
    blocks.allocate_sequence(reuse)
    blocks.free(reuse.block_table)  # ... and let go of last: now the most recent
    taken = blocks.allocate(3)  # 2 never named + 1 cached: new's, not old's
    assert old.block_table[0] not in taken and new.block_table[0] in taken
    assert blocks.cache_hits(seq(3, [1, 2, 3, 4, 7])) == [old.block_table[0]]


def test_admission_counts_revived_cached_blocks_against_the_reserve() -> None:
    blocks = BlockManager(4, BS)
    a = seq(0, list(range(1, 10)))  # 3 blocks, 2 of them full
    blocks.allocate_sequence(a)
    compute(blocks, a, 9)
    blocks.free(a.block_table)  # 4 free: 2 cached + 2 never named
    again = seq(1, list(range(1, 12)))  # 2 hits (revived) + 1 fresh = 3 taken from the pool
    assert not blocks.allocate_sequence(again, reserve=2)  # would leave 1
    assert again.block_table == [] and blocks.num_cached == 2 and blocks.num_free == 4
    assert blocks.allocate_sequence(again, reserve=1)
    assert blocks.num_free == 1 and again.num_computed == 8


def test_a_started_sequence_takes_over_blocks_computed_since_by_another() -> None:
    """Two sequences with a common 2-block prefix start together (no hit for either); once
    the first has computed the prefix, the second swaps its own blocks, not yet written,
    for the first's before its prefill chunk, and starts after them."""
    blocks = BlockManager(12, BS)
    a, b = seq(0, [*range(1, 9), 20, 21]), seq(1, [*range(1, 9), 30, 31, 32, 33, 34])
    blocks.allocate_sequence(a)
    blocks.allocate_sequence(b)
    assert a.num_computed == b.num_computed == 0
    compute(blocks, a, 6)  # a chunk: only block 0 is full
    own = list(b.block_table)
    blocks.take_cached_blocks(b)
    assert b.block_table == [a.block_table[0], *own[1:]] and b.num_computed == 4
    assert b.cached_prompt_tokens == 4 and blocks.hit_tokens == 4
    check_accounting(blocks, [a, b])
    compute(blocks, a, 4)  # block 1 is full now too
    blocks.take_cached_blocks(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert b.cached_prompt_tokens == 8 and blocks.hit_tokens == 8
    assert own[0] in blocks._free and own[1] in blocks._free  # never written, never named
    check_accounting(blocks, [a, b])
    compute(blocks, b, 1)  # mid-block: nothing to take over
    blocks.take_cached_blocks(b)
    assert b.num_computed == 9
    b.num_preemptions = 1  # a recomputation after preemption is a hit, not reported
    blocks.free(b.block_table)
    b.block_table = []
    blocks.allocate_sequence(b)
    assert b.num_computed == 8 and b.cached_prompt_tokens == 8 and blocks.hit_tokens == 16


def test_a_chunk_that_an_earlier_chunk_computes_in_the_same_step_waits_a_step() -> None:
    """Three prompts with a common 3-block prefix start together under a large prefill
    budget: only the first computes the prefix; the others wait one step, take it over,
    and compute only their own tokens. A prompt with nothing in common is not held up."""
    blocks = BlockManager(32, BS)
    scheduler = Scheduler(blocks, BS, max_batch_size=8, prefill_budget=64)
    common = list(range(1, 13))
    a, b, c = seq(0, [*common, 50]), seq(1, [*common, 60, 61]), seq(2, [*common, 70])
    other = seq(3, list(range(80, 95)))
    for s in (a, b, c, other):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert [(s.handle, n) for s, n in batch.prefills] == [(0, 13), (3, 15)]
    for s, n in batch.prefills:
        compute(blocks, s, n)
        s.generated.append(7)
    batch = scheduler.schedule()
    assert [(s.handle, n) for s, n in batch.prefills] == [(1, 2), (2, 1)]
    assert b.num_computed == c.num_computed == 12 and b.block_table[:3] == a.block_table[:3]
    assert (b.cached_prompt_tokens, c.cached_prompt_tokens) == (12, 12)
    check_accounting(blocks, scheduler.running)


def test_preempting_or_cancelling_a_sharer_never_frees_a_block_another_holds() -> None:
    blocks = BlockManager(8, BS)
    a, b = seq(0, list(range(1, 14))), seq(1, [*range(1, 9), 40, 41, 42])
    blocks.allocate_sequence(a)
    compute(blocks, a, 13)
    blocks.allocate_sequence(b)
    assert b.block_table[:2] == a.block_table[:2]
    blocks.free(a.block_table)  # a cancelled (or preempted): b still holds the shared two
    assert [blocks.ref_count[x] for x in a.block_table] == [1, 1, 0, 0]
    assert blocks.num_cached == 1  # a's third block (full, named); its fourth is free
    check_accounting(blocks, [b])
    blocks.allocate(blocks.num_free)  # the pool is drained: only unheld blocks are taken
    assert all(blocks.ref_count[x] == 1 for x in b.block_table)
    with pytest.raises(MemoryError):
        blocks.allocate(1)


def test_the_same_blocks_computed_twice_at_once_stay_consistent() -> None:
    """Two equal prompts admitted in one step both compute their blocks; the first to
    finish names them, the other's copies stay unnamed and are freed, not cached."""
    blocks = BlockManager(8, BS)
    a, b = seq(0, list(range(1, 10))), seq(1, list(range(1, 10)))
    blocks.allocate_sequence(a)
    blocks.allocate_sequence(b)
    compute(blocks, a, 9)
    compute(blocks, b, 9)
    assert [blocks.hash_of[x] is not None for x in a.block_table] == [True, True, False]
    assert all(blocks.hash_of[x] is None for x in b.block_table)
    blocks.free(b.block_table)
    blocks.free(a.block_table)
    assert blocks.num_cached == 2 and blocks.num_free == 8
    check_accounting(blocks, [])


def test_prefix_caching_off_shares_nothing() -> None:
    blocks = BlockManager(8, BS, enable_prefix_caching=False)
    a, b = seq(0, list(range(1, 10))), seq(1, list(range(1, 10)))
    blocks.allocate_sequence(a)
    compute(blocks, a, 9)
    blocks.allocate_sequence(b)
    assert b.num_computed == 0 and b.cached_prompt_tokens == 0 and not blocks.cached
    assert not set(a.block_table) & set(b.block_table)
    blocks.free(a.block_table)
    assert blocks.num_cached == 0 and (blocks.query_tokens, blocks.hit_tokens) == (0, 0)


# -- the scheduler under random load, with a shadow of the pool's contents -----------------------
BASE = list(range(100, 140))  # the shared "system prompt": prompts take 0..40 tokens of it


def next_token(tokens: list[int]) -> int:
    """The fake model: a pure function of the sequence, so equal prefixes continue alike."""
    return (sum(tokens) * 31 + len(tokens)) % 97 + 1


class SchedulerWithSharing(RuleBasedStateMachine):
    """add / step / cancel on a tight pool; preemption happens by itself."""

    def __init__(self, num_blocks: int = 20, prefill_budget: int = 9) -> None:
        super().__init__()
        self.blocks = BlockManager(num_blocks, BS)
        self.scheduler = Scheduler(self.blocks, BS, max_batch_size=4, prefill_budget=prefill_budget)
        self.live: dict[int, Sequence] = {}
        self.wanted: dict[int, int] = {}
        self.content: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix
        self.handles = 0
        self.hits = 0

    @rule(
        shared=st.sampled_from([0, 1, 3, 4, 7, 8, 12, 16, 21, 40]),
        suffix=st.integers(0, 9),
        salt=st.integers(0, 2),
        priority=st.sampled_from(list(Priority)),
        new_tokens=st.integers(1, 14),
    )
    def add(self, shared: int, suffix: int, salt: int, priority: Priority, new_tokens: int) -> None:
        prompt = BASE[:shared] + [7 + salt] * suffix
        if not prompt:
            prompt = [5]
        prompt = prompt[:36]  # prompt + tokens stay within half the pool
        s = seq(self.handles, prompt, priority)
        self.scheduler.add(s)
        self.live[s.handle], self.wanted[s.handle] = s, new_tokens
        self.handles += 1

    @rule()
    def step(self) -> None:
        batch = self.scheduler.schedule()
        assert not batch.empty or not self.live
        self.hits += sum(s.num_computed > 0 for s, _ in batch.prefills)
        self.run(batch)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(sorted(self.live)))
        self.scheduler.remove(self.live.pop(handle))

    def run(self, batch: ScheduledBatch) -> None:
        """BatchProcessor.update_states with a fake model that writes the shadow pool."""
        work = [(s, 1) for s in batch.decodes] + batch.prefills
        for s, n in work:
            tokens = s.tokens
            for pos in range(s.num_computed, s.num_computed + n):
                block = s.block_table[pos // BS]
                assert self.blocks.ref_count[block] == 1, "wrote into a shared block"
                assert self.blocks.hash_of[block] is None, "wrote into a cached block"
                self.content[(block, pos % BS)] = tuple(tokens[: pos + 1])
        for s, n in work:
            compute(self.blocks, s, n)
        for s, _ in work:
            if s.num_computed == s.current_length:
                s.generated.append(next_token(s.tokens))
                if s.tokens_generated >= self.wanted[s.handle]:
                    self.scheduler.remove(self.live.pop(s.handle))

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        check_accounting(self.blocks, self.scheduler.running)
        assert all(not s.block_table for s in self.scheduler.waiting)

    @invariant()
    def every_computed_position_holds_its_own_prefix(self) -> None:
        for s in self.scheduler.running:
            tokens = s.tokens
            for pos in range(s.num_computed):
                got = self.content.get((s.block_table[pos // BS], pos % BS))
                assert got == tuple(tokens[: pos + 1]), (s.handle, pos)

    def teardown(self) -> None:
        for _ in range(2000):
            if not self.live:
                break
            self.step()
            self.every_computed_position_holds_its_own_prefix()
        assert not self.live, "no progress"
        assert self.scheduler.running == [] and self.scheduler.waiting == []
        assert self.blocks.num_free == self.blocks.num_blocks and self.blocks.num_used == 0
        assert all(c == 0 for c in self.blocks.ref_count)
        check_accounting(self.blocks, [])


SchedulerWithSharing.TestCase.settings = settings(
    derandomize=True,  # the suite replays fixed examples; nothing flakes
    database=None,
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_with_sharing_keeps_every_invariant = SchedulerWithSharing.TestCase


@pytest.mark.parametrize(
    ("num_blocks", "budget", "min_new", "what"),
    [(20, 9, 10, "preemptions"), (32, 4, 1, "take-overs")],
)
def test_random_load_shares_and_preempts(num_blocks: int, budget: int, min_new: int, what: str):
    """The state machine's kind of load really exercises hits, preemption while sharing
    (a tight pool, long outputs) and take-overs (a roomy pool, a small prefill budget)."""
    machine = SchedulerWithSharing(num_blocks, budget)
    take = machine.blocks.take_cached_blocks
    taken = []

    def counting(s: Sequence) -> None:
        before = s.num_computed
        take(s)
        taken.append(s.num_computed > before)

    machine.blocks.take_cached_blocks = counting  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    for i in range(300):
        if i % 6 == 0:  # a burst of 3 with one prefix: they start together
            shared = int(rng.choice([0, 4, 8, 21, 40]))
            for _ in range(3):
                machine.add(
                    shared,
                    int(rng.integers(0, 9)),
                    int(rng.integers(0, 3)),
                    Priority(int(rng.integers(0, 3))),
                    int(rng.integers(min_new, 14)),
                )
        machine.step()
        machine.blocks_are_accounted_for()
        machine.every_computed_position_holds_its_own_prefix()
    machine.teardown()
    assert machine.hits > 50 and machine.blocks.hit_tokens > 0 and machine.blocks.num_cached > 0
    count = {"preemptions": machine.scheduler.num_preemptions, "take-overs": sum(taken)}
    assert count[what] > 5, count


# -- the engine: tokens with and without the cache --------------------------------------------
def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, size=n).tolist()


SYSTEM = prompt(40, seed=100)  # 2.5 blocks of 16
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, seed=7, ignore_eos=True)


def shared_prefix_requests() -> list[Request]:
    """Prompts sharing prefixes of 16 (block-aligned), 32, 40 and 17 tokens, an exact repeat
    (cached to its end), and a prompt of exactly 2 blocks repeated; greedy and seeded."""
    cases = [
        SYSTEM + prompt(8, 1),
        SYSTEM + prompt(8, 2),  # 40 shared: 2 blocks cached
        SYSTEM[:32] + prompt(5, 3),  # block-aligned prefix: 2 blocks cached
        SYSTEM[:17] + prompt(20, 4),  # 1 block and one token
        SYSTEM + prompt(8, 1),  # an exact repeat: cached to its last block
        SYSTEM[:32],  # exactly 2 blocks, all cached: the second is recomputed
        SYSTEM[:32],
    ]
    return [Request(f"r{i}", ids, GREEDY if i % 2 == 0 else SEEDED) for i, ids in enumerate(cases)]


def run_one_by_one(processor: BatchProcessor, requests: list[Request]) -> dict:
    done = {}
    for r in requests:
        done.update(run_to_completion(processor, [r]))
    return done


def assert_no_leak(processor: BatchProcessor) -> None:
    blocks = processor.scheduler.block_manager
    assert not processor.has_work()
    assert all(c == 0 for c in blocks.ref_count) and blocks.num_used == 0
    assert blocks.num_free == blocks.num_blocks == processor.layout.num_blocks
    stats = processor.get_stats()
    assert stats.kv_blocks_used == 0 and stats.kv_free_tokens == processor.layout.capacity_tokens


def test_tokens_identical_with_and_without_prefix_caching(make_processor) -> None:
    requests = shared_prefix_requests()
    plain = run_one_by_one(make_processor(prefix_caching=False), requests)
    cached_processor = make_processor()
    cached = run_one_by_one(cached_processor, requests)
    assert {k: c.token_ids for k, c in cached.items()} == {k: c.token_ids for k, c in plain.items()}
    assert [cached[f"r{i}"].cached_prompt_tokens for i in range(7)] == [0, 32, 32, 16, 32, 16, 16]
    assert all(c.cached_prompt_tokens == 0 for c in plain.values())
    stats = cached_processor.get_stats()
    assert stats.prefix_cache_hit_tokens == 32 + 32 + 16 + 32 + 16 + 16
    assert stats.prefix_cache_query_tokens == sum(len(r.prompt_ids) for r in requests)
    assert stats.kv_blocks_cached > 0
    assert_no_leak(cached_processor)

    batched = make_processor()  # all at once: nothing is cached yet when they start
    together = run_to_completion(batched, requests)
    assert {k: c.token_ids for k, c in together.items()} == {
        k: c.token_ids for k, c in plain.items()
    }
    assert_no_leak(batched)


def test_requests_starting_together_compute_their_common_prefix_once(make_processor) -> None:
    """8 requests with a 120-token common prefix start in one step; the prefill budget is
    32 tokens a step, so each later request takes over the blocks computed before its turn."""
    requests = [
        Request(
            f"t{i}", prompt(120, seed=500) + prompt(10, seed=510 + i), GREEDY if i % 2 else SEEDED
        )
        for i in range(8)
    ]
    plain = make_processor(prefix_caching=False)
    want = run_to_completion(plain, requests)
    processor = make_processor()
    got = run_to_completion(processor, requests)
    assert {k: c.token_ids for k, c in got.items()} == {k: c.token_ids for k, c in want.items()}
    cached = [got[f"t{i}"].cached_prompt_tokens for i in range(8)]
    assert cached[0] == 0 and all(c == 112 for c in cached[1:])  # 7 whole blocks of 120
    stats = processor.get_stats()
    assert stats.prefix_cache_hit_tokens == 7 * 112
    assert stats.prefix_cache_query_tokens == 8 * 130
    assert_no_leak(processor)


def test_generated_tokens_are_cached_for_the_next_turn(make_processor) -> None:
    """A multi-turn conversation: each turn's prompt is the last turn's prompt + answer +
    a new message, so its prefix includes blocks written during decoding."""
    processor, plain = make_processor(), make_processor(prefix_caching=False)
    history, computed = list(SYSTEM), 0
    for turn in range(3):
        history += prompt(6, seed=200 + turn)
        r = Request(f"t{turn}", list(history), SamplingParams(max_new_tokens=20, ignore_eos=True))
        got = run_to_completion(processor, [r])[r.request_id]
        want = run_to_completion(plain, [r])[r.request_id]
        assert got.token_ids == want.token_ids
        # The previous turn computed K/V for its prompt and all but its last token.
        assert got.cached_prompt_tokens == computed // 16 * 16
        computed = len(history) + 19
        history += got.token_ids
    assert_no_leak(processor)


def test_eviction_under_a_small_pool_keeps_tokens_identical(make_processor) -> None:
    """A pool of 12 blocks (192 tokens) and 6 distinct 60-token prompts, run in order and
    then in reverse: cached blocks are evicted, least recently used first, to make room;
    the reverse pass hits what is left (the latest prompts), not what was evicted."""
    small = {"kv_cache_mb": 12 * 16 * 2048 / 2**20, "max_batch_size": 2}
    order = [*range(6), *reversed(range(6))]
    requests = [Request(f"p{i}-{k}", prompt(60, seed=300 + i), GREEDY) for k, i in enumerate(order)]
    plain = run_one_by_one(make_processor(prefix_caching=False, **small), requests)
    processor = make_processor(**small)
    assert processor.layout.num_blocks == 12
    cached = run_one_by_one(processor, requests)
    assert {k: c.token_ids for k, c in cached.items()} == {k: c.token_ids for k, c in plain.items()}
    hits = [c.cached_prompt_tokens for c in cached.values()]
    assert hits[:6] == [0] * 6  # distinct prompts
    assert hits[6] == 48  # p5 again, right after itself: 3 blocks (59 // 16)
    assert hits[-1] == 0  # p0's blocks were evicted long ago
    stats = processor.get_stats()
    assert stats.prefix_cache_hit_tokens == sum(hits) and stats.kv_blocks_cached > 0
    assert_no_leak(processor)


def test_preemption_while_blocks_are_shared_keeps_tokens_identical(make_processor) -> None:
    """8 requests sharing a 40-token prefix, with long outputs, in a 16-block pool: they
    preempt one another while sharing, and are recomputed mostly from the cache."""
    tight = {"kv_cache_mb": 16 * 16 * 2048 / 2**20, "max_batch_size": 8}
    requests = [
        Request(
            f"s{i}",
            SYSTEM + prompt(3, seed=400 + i),
            SamplingParams(
                max_new_tokens=40, ignore_eos=True, temperature=0.8 * (i % 2), seed=11 + i
            ),
            [Priority.HIGH, Priority.NORMAL, Priority.LOW][i % 3],
        )
        for i in range(8)
    ]
    alone = run_one_by_one(make_processor(prefix_caching=False, max_batch_size=1), requests)
    processor = make_processor(**tight)
    together = run_to_completion(processor, requests)
    assert {k: c.token_ids for k, c in together.items()} == {
        k: c.token_ids for k, c in alone.items()
    }
    stats = processor.get_stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    assert_no_leak(processor)


def test_cancelling_a_sharer_leaves_the_others_intact(make_processor) -> None:
    """Three sequences share 2 cached blocks; two are cancelled (one right after its first
    token, one while decoding): the third's tokens are those of a run without the cache."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    plain = make_processor(prefix_caching=False)
    want = run_to_completion(plain, [Request("b", list(SYSTEM), params)])["b"].token_ids
    processor = make_processor()
    run_to_completion(processor, [Request("warm", [*SYSTEM, 1, 2], params)])  # caches 3 blocks
    processor.add_request(0, [*SYSTEM, 3, 4, 5], params)
    processor.add_request(1, list(SYSTEM), params)
    processor.add_request(2, [*SYSTEM, 6], params)
    got = [r.token_id for r in processor.process_step() if r.handle == 1]
    table = processor._by_handle[1].block_table
    blocks = processor.scheduler.block_manager
    assert [blocks.ref_count[b] for b in table[:2]] == [3, 3]
    record = processor.cancel(0)
    assert record is not None and record.finish_reason == FinishReason.CANCELLED
    assert record.cached_prompt_tokens == 32
    assert [blocks.ref_count[b] for b in table[:2]] == [2, 2]
    got += [r.token_id for r in processor.process_step() if r.handle == 1]
    processor.cancel(2)
    assert [blocks.ref_count[b] for b in table[:2]] == [1, 1]
    while processor.has_work():
        got += [r.token_id for r in processor.process_step() if r.handle == 1]
    assert got == want
    assert_no_leak(processor)


def test_resumed_request_reports_only_prompt_tokens_as_cached(make_processor) -> None:
    """A request resumed on this worker with tokens generated elsewhere: its prompt and
    tokens hit the cache, but cached_prompt_tokens counts prompt tokens only."""
    processor = make_processor()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    first = run_to_completion(processor, [Request("a", SYSTEM[:20], params)])["a"]
    generated = first.token_ids[:25]  # 45 tokens: 2 full blocks cached
    processor.add_request(9, SYSTEM[:20], params, generated=generated)
    records = []
    while processor.has_work():
        records += processor.process_step()
    assert [r.token_id for r in records] == first.token_ids[25:]
    assert {r.cached_prompt_tokens for r in records} == {20}
    assert processor.get_stats().prefix_cache_hit_tokens == 32
    assert_no_leak(processor)


def test_engine_config_turns_prefix_caching_off(make_processor) -> None:
    processor = make_processor(prefix_caching=False)
    assert not processor.scheduler.block_manager.enable_prefix_caching
    run_one_by_one(processor, shared_prefix_requests())
    stats = processor.get_stats()
    assert (stats.prefix_cache_query_tokens, stats.prefix_cache_hit_tokens) == (0, 0)
    assert stats.kv_blocks_cached == 0 and stats.prefix_cache_hit_rate == 0.0
    assert_no_leak(processor)
