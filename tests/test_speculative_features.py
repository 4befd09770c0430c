"""Speculative decoding combined with the engine's other features (random checkpoints):
penalties and logprobs on verified tokens, batch-invariant logits of verify rows, and the
prefix cache (the same tokens, no leaked block, only verified tokens' blocks cached)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from speculation_costs import FlatCosts

from worker.batch_processor import BatchProcessor, Completion, Request, run_to_completion
from worker.block_manager import ROOT_HASH, block_hash
from worker.channel.types import SamplingParams

Make = Callable[..., BatchProcessor]
Key = tuple[int, tuple[int, ...]]  # (handle, completion so far): the context of one logits row


def copying_prompt(seed: int, length: int = 10) -> list[int]:
    """A phrase said three times: prompt lookup finds it, and the model tends to go on."""
    return np.random.default_rng(seed).integers(3, 512, size=length).tolist() * 3


def requests_with(**fields: object) -> list[Request]:
    """Copying prompts, greedy and seeded, each with `fields` set on its SamplingParams."""
    specs = []
    for i in range(6):
        temperature = 0.0 if i < 3 else 0.8
        params = SamplingParams(max_new_tokens=24 + i, temperature=temperature, seed=50 + i)
        specs.append(Request(f"r{i}", copying_prompt(i), dataclasses.replace(params, **fields)))
    return specs


def speculating(make_processor: Make, **overrides: object) -> BatchProcessor:
    """Prompt lookup that verifies every lookup it finds (a fixed cost model)."""
    processor = make_processor(num_speculative_tokens=4, **overrides)
    processor.speculator.costs = FlatCosts()
    return processor


def completions(processor: BatchProcessor, requests: list[Request]) -> dict[str, Completion]:
    return run_to_completion(processor, requests)


def tokens(done: dict[str, Completion]) -> dict[str, list[int]]:
    return {k: c.token_ids for k, c in done.items()}


# -- penalties ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "penalty",
    [
        {"repetition_penalty": 1.3},
        {"frequency_penalty": 0.7},
        {"presence_penalty": 1.1},
        {"repetition_penalty": 0.8, "frequency_penalty": -0.5, "presence_penalty": 0.5},
    ],
)
def test_penalised_requests_get_plain_decodings_tokens(
    make_processor: Make, default_model: Path, penalty: dict
) -> None:
    requests = requests_with(**penalty)
    plain = tokens(completions(make_processor(), requests))
    unpenalised = tokens(completions(make_processor(), requests_with()))
    assert plain != unpenalised  # the penalties change these answers
    lookup = speculating(make_processor)
    assert tokens(completions(lookup, requests)) == plain  # greedy and seeded
    # The model drafting for itself (unpenalised) drafts every step: greedy requests.
    greedy = [r for r in requests if r.params.greedy]
    drafting = make_processor(num_speculative_tokens=3, draft_model=str(default_model))
    assert tokens(completions(drafting, greedy)) == {
        r.request_id: plain[r.request_id] for r in greedy
    }
    stats = [p.get_stats() for p in (lookup, drafting)]
    assert sum(s.accepted_draft_tokens for s in stats) > 5  # rows after drafts penalised too


# -- logprobs -------------------------------------------------------------------------------
def test_verified_tokens_carry_plain_decodings_logprobs(make_processor: Make) -> None:
    requests = requests_with(logprobs=True, top_logprobs=3, repetition_penalty=1.2)
    requests += [Request("quiet", copying_prompt(9), SamplingParams(max_new_tokens=20))]
    plain = completions(make_processor(), requests)
    processor = speculating(make_processor)
    spec = completions(processor, requests)
    assert processor.get_stats().accepted_draft_tokens > 0
    assert tokens(spec) == tokens(plain)
    assert spec["quiet"].logprobs == []  # only for the requests that ask
    for key, done in spec.items():
        if key == "quiet":
            continue
        assert [lp.token_id for lp in done.logprobs] == done.token_ids
        for got, want in zip(done.logprobs, plain[key].logprobs, strict=True):
            # Default mode: a verify row's logits may differ from the decode's in last bits.
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


# -- batch invariance -----------------------------------------------------------------------
def capture_logits(processor: BatchProcessor) -> tuple[dict[Key, np.ndarray], set[Key]]:
    """Record every logits row the model computes, keyed by the context it predicts after
    (a sampled row: the sequence's completion so far; verify row j: that plus the first j
    drafts), and the keys of verify rows after at least one draft."""
    runner, rows, after_drafts = processor.runner, {}, set()
    prepare, forward, pending = runner.prepare, runner.model.forward, []

    def spy_prepare(batch):
        step, sampled = prepare(batch)
        keys = [(s.handle, tuple(s.generated)) for s in sampled]
        for seq, draft in batch.drafts.items():
            context = seq.generated + draft.tokens
            for j in range(len(draft.tokens) + 1):
                keys.append((seq.handle, tuple(context[: len(seq.generated) + j])))
                if j:
                    after_drafts.add(keys[-1])
        pending.append(keys)
        return step, sampled

    def spy_forward(step, cache):
        logits = forward(step, cache)  # (rows, vocab)
        for key, row in zip(pending.pop(), np.asarray(logits), strict=True):
            rows.setdefault(key, row.copy())
        return logits

    runner.prepare, runner.model.forward = spy_prepare, spy_forward
    return rows, after_drafts


def test_batch_invariant_verify_rows_equal_the_decode_steps_bit_for_bit(
    make_processor: Make,
) -> None:
    requests = requests_with(logprobs=True, top_logprobs=5)
    plain_processor = make_processor(batch_invariant=True)
    plain_rows, _ = capture_logits(plain_processor)
    plain = completions(plain_processor, requests)
    processor = speculating(make_processor, batch_invariant=True)
    spec_rows, after_drafts = capture_logits(processor)
    spec = completions(processor, requests)
    assert tokens(spec) == tokens(plain)
    for key, done in spec.items():
        assert done.logprobs == plain[key].logprobs  # exactly: every float equal
    # Every emitted token's logits row equals, bit for bit, the row plain decoding
    # computed for the same context; many of them are verify rows after accepted drafts.
    handles = {r.request_id: h for h, r in enumerate(requests)}
    checked = set()
    for key, done in spec.items():
        for i in range(len(done.token_ids)):
            context = (handles[key], tuple(done.token_ids[:i]))
            assert np.array_equal(spec_rows[context], plain_rows[context]), (key, i)
            checked.add(context)
    assert len(checked & after_drafts) > 20


# -- prefix caching -------------------------------------------------------------------------
def check_blocks(processor: BatchProcessor) -> None:
    """No block leaked: every block is free, cached with ref count 0, or held by exactly its
    ref count of running sequences; a named block holds verified tokens, under their hash."""
    blocks, scheduler = processor.scheduler.block_manager, processor.scheduler
    counts = [0] * blocks.num_blocks
    for seq in scheduler.running:
        for b in seq.block_table:
            counts[b] += 1
    assert blocks.ref_count == counts
    free, cached = set(blocks._free), set(blocks._evictable)
    assert not free & cached and len(free) == len(blocks._free)
    assert all(counts[b] == 0 and blocks.hash_of[b] is None for b in free)
    assert all(counts[b] == 0 and blocks.hash_of[b] is not None for b in cached)
    assert sum(c > 0 for c in counts) + len(free) + len(cached) == blocks.num_blocks
    bs = scheduler.block_size
    for seq in scheduler.running:
        parent = ROOT_HASH
        for i, b in enumerate(seq.block_table):
            if (i + 1) * bs > seq.num_computed:  # not full of computed, emitted tokens
                assert blocks.hash_of[b] is None, (seq.handle, i)
                continue
            parent = block_hash(parent, seq.tokens[i * bs : (i + 1) * bs])  # recomputed here
            assert blocks.hash_of[b] in (None, parent), (seq.handle, i)


def shared_prefix_requests() -> list[Request]:
    """A 40-token common prefix (two and a half blocks), then a copying suffix each."""
    prefix = np.random.default_rng(99).integers(3, 512, size=40).tolist()
    return [
        Request(f"s{i}", prefix + copying_prompt(20 + i, 6), SamplingParams(max_new_tokens=28))
        for i in range(5)
    ]


def test_prefix_cache_with_speculation_same_tokens_and_no_leak(make_processor: Make) -> None:
    requests = shared_prefix_requests()
    plain = tokens(completions(make_processor(prefix_caching=False), requests))
    processor = speculating(make_processor)  # prefix caching on: the default
    done = {}
    for request in requests:  # one by one, so each finds the earlier ones' blocks
        done.update(run_to_completion(processor, [request], lambda _: check_blocks(processor)))
    assert tokens(done) == plain
    together = speculating(make_processor)
    batched = run_to_completion(together, requests, lambda _: check_blocks(together))
    assert tokens(batched) == plain
    for p in (processor, together):
        stats = p.get_stats()
        assert stats.accepted_draft_tokens > 0 and stats.prefix_cache_hit_tokens > 0
        assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached > 0
        check_blocks(p)
    assert [done[f"s{i}"].cached_prompt_tokens for i in range(5)] == [0, 32, 32, 32, 32]


def test_blocks_filled_by_accepted_drafts_serve_the_next_turn(make_processor: Make) -> None:
    """Multi-turn: turn 2's prompt is turn 1's prompt and answer; its cached blocks include
    those accepted drafts filled. Batch-invariant, so cached K/V must be bitwise right."""
    first = requests_with(max_new_tokens=40)[:3]
    processor = speculating(make_processor, batch_invariant=True)
    one = completions(processor, first)
    assert processor.get_stats().accepted_draft_tokens > 0
    second = [
        Request(f"t{r.request_id}", r.prompt_ids + one[r.request_id].token_ids + [7, 8], r.params)
        for r in first
    ]
    two = run_to_completion(processor, second, lambda _: check_blocks(processor))
    assert all(c.cached_prompt_tokens >= 48 for c in two.values())
    fresh = completions(make_processor(batch_invariant=True, prefix_caching=False), second)
    assert tokens(two) == tokens(fresh)
