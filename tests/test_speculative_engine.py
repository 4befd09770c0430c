"""Speculative decoding in the engine (random checkpoints): the same tokens as plain
decoding, stops inside accepted runs, KV rollback, the draft model, config and stats."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from speculation_costs import DearRows, FlatCosts

from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, FinishReason, SamplingParams, TokenRecord
from worker.kv_cache import blocks_for
from worker.random_checkpoint import write_checkpoint
from worker.sequence import Sequence
from worker.spec_policy import StepCosts
from worker.speculator import Speculator

Make = Callable[..., BatchProcessor]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `default` preset with other random weights: a draft model that rarely agrees."""
    return write_checkpoint(tmp_path_factory.mktemp("models") / "other", "default", seed=1)


def copying_prompt(seed: int) -> list[int]:
    """A phrase said three times: prompt lookup finds it, and the model tends to go on."""
    return np.random.default_rng(seed).integers(3, 512, size=10).tolist() * 3


def mixed_requests() -> list[Request]:
    """Copying and random prompts, greedy and seeded sampling, stop ids and EOS on."""
    rng = np.random.default_rng(7)
    specs = []
    for i in range(8):
        ids = copying_prompt(i) if i % 2 == 0 else rng.integers(3, 512, size=9 + i).tolist()
        temperature = 0.0 if i < 5 else 0.8
        params = SamplingParams(max_new_tokens=30 + i, temperature=temperature, seed=100 + i)
        specs.append(Request(f"r{i}", ids, params))
    return specs


def tokens_of(processor: BatchProcessor, requests: list[Request]) -> dict[str, list[int]]:
    return {k: c.token_ids for k, c in run_to_completion(processor, requests).items()}


def check_kv(processor: BatchProcessor) -> None:
    """No block leaked: every used block is in a running sequence's table; a decoding
    sequence holds exactly the blocks of its computed tokens (rejected drafts' are back)."""
    scheduler = processor.scheduler
    held = [b for s in scheduler.running for b in s.block_table]
    assert len(held) == len(set(held)) == scheduler.block_manager.num_used
    for seq in scheduler.running:
        if seq.generated and seq.num_pending == 1:
            assert len(seq.block_table) == blocks_for(seq.num_computed, scheduler.block_size)


def run_checked(processor: BatchProcessor, requests: list[Request]) -> dict[str, list[int]]:
    """run_to_completion, checking the KV invariants after every step."""
    return {
        k: c.token_ids
        for k, c in run_to_completion(processor, requests, lambda _: check_kv(processor)).items()
    }


def lookup_processor(make_processor: Make, costs: StepCosts, **overrides: object) -> BatchProcessor:
    """Prompt lookup with a fixed cost model, so what gets drafted does not hang on timing."""
    processor = make_processor(num_speculative_tokens=4, **overrides)
    processor.speculator.costs = costs
    return processor


def test_ngram_speculation_emits_exactly_plain_decodings_tokens(make_processor: Make) -> None:
    requests = mixed_requests()
    plain = tokens_of(make_processor(), requests)
    processor = lookup_processor(make_processor, FlatCosts())
    mixed_steps = []
    propose = processor.speculator.propose

    def spy(batch, scheduler) -> None:
        propose(batch, scheduler)
        if batch.drafts and len(batch.drafts) < len(batch.decodes):
            mixed_steps.append(len(batch.decodes))

    processor.speculator.propose = spy  # type: ignore[method-assign]
    assert run_checked(processor, requests) == plain  # greedy and seeded sampling alike
    stats = processor.get_stats()
    assert stats.accepted_draft_tokens > 20 and stats.draft_tokens >= stats.accepted_draft_tokens
    assert mixed_steps, "no step mixed speculating and plain decodes"
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("draft", ["same", "other"])
def test_draft_model_greedy_tokens_equal_plain_decoding(
    make_processor: Make, default_model: Path, other_model: Path, draft: str
) -> None:
    requests = [r for r in mixed_requests() if r.params.greedy]
    plain = tokens_of(make_processor(), requests)
    draft_model = default_model if draft == "same" else other_model
    processor = make_processor(num_speculative_tokens=3, draft_model=str(draft_model))
    assert run_checked(processor, requests) == plain
    stats = processor.get_stats()
    pool = processor.speculator.draft_model.allocator
    assert pool.num_used == 0  # every finished sequence gave its draft KV back
    if draft == "same":  # the target drafting for itself: nearly everything accepted
        assert stats.accepted_draft_tokens >= 0.9 * stats.draft_tokens > 0
    else:  # a stranger: few accepted, so the policy soon stops drafting
        assert stats.accepted_draft_tokens < 0.5 * stats.draft_tokens
        generated = sum(len(t) for t in plain.values())
        assert 0 < stats.draft_tokens < 0.25 * generated


def test_seeded_sampling_with_a_draft_model_is_reproducible(
    make_processor: Make, other_model: Path, default_model: Path
) -> None:
    requests = [r for r in mixed_requests() if not r.params.greedy]

    def speculating(draft: Path, batch: int = 8) -> BatchProcessor:
        return make_processor(
            num_speculative_tokens=3, draft_model=str(draft), max_batch_size=batch
        )

    # A request's drafts depend on its own history only, so its tokens do not change
    # with the batch it runs in.
    together = tokens_of(speculating(other_model), requests)
    for r in requests:
        assert tokens_of(speculating(other_model, batch=1), [r]) == {
            r.request_id: together[r.request_id]
        }
    # The target drafting for itself draws each draft with the plain sampler's draw, so
    # the accepted tokens are plain sampling's.
    assert tokens_of(speculating(default_model), requests) == tokens_of(make_processor(), requests)


def step_records(processor: BatchProcessor, request: Request) -> list[list[TokenRecord]]:
    """The request's records, grouped by the engine step that emitted them."""
    steps: list[list[TokenRecord]] = []
    run_to_completion(processor, [request], steps.append)
    return [s for s in steps if s]


def inside_a_run(processor: Make) -> tuple[Request, list[int], int]:
    """A request, its tokens, and an index `cut` whose token is emitted in the middle of
    a speculative step's run (neither its first nor its last) and nowhere before."""
    for seed in range(20):
        request = Request(
            "s", copying_prompt(seed), SamplingParams(max_new_tokens=40, ignore_eos=True)
        )
        steps = step_records(processor(), request)
        tokens = [r.token_id for s in steps for r in s]
        for run in steps:
            for record in run[1:-1]:
                if tokens.index(record.token_id) == record.index:
                    return request, tokens, record.index
    raise AssertionError("no speculative step with a fresh token inside its run")


@pytest.mark.parametrize("stop", ["stop_token_ids", "eos", "max_new_tokens"])
def test_a_stop_inside_an_accepted_run_ends_there(
    make_processor: Make, default_model: Path, stop: str
) -> None:
    def speculating() -> BatchProcessor:
        return make_processor(num_speculative_tokens=4, draft_model=str(default_model))

    request, tokens, cut = inside_a_run(speculating)
    params, processor = request.params, speculating()
    if stop == "stop_token_ids":
        params, want = dataclasses.replace(params, stop_token_ids=(tokens[cut],)), FinishReason.STOP
    elif stop == "eos":
        params, want = dataclasses.replace(params, ignore_eos=False), FinishReason.EOS
        config = dataclasses.replace(processor.model_config, eos_token_ids=(tokens[cut],))
        processor.model_config = config  # this token is the model's EOS now
    else:
        params, want = dataclasses.replace(params, max_new_tokens=cut + 1), FinishReason.LENGTH
    steps = step_records(processor, dataclasses.replace(request, params=params))
    records = [r for s in steps for r in s]
    assert [r.token_id for r in records] == tokens[: cut + 1]
    assert [r.index for r in records] == list(range(cut + 1))
    assert records[-1].finish_reason == want
    assert all(r.finish_reason == FinishReason.NONE for r in records[:-1])
    if stop != "max_new_tokens":  # (drafts are cut to max_new_tokens before they are made)
        assert len(steps[-1]) > 1, "the stop was not inside a speculative step"
    assert processor.get_stats().kv_blocks_used == 0


def test_drafts_shrink_to_the_free_kv_and_never_leak(make_processor: Make) -> None:
    # 12 blocks of 16 tokens for 8 growing sequences: drafts compete with decodes for blocks.
    requests = [
        Request(f"p{i}", copying_prompt(i)[:12], SamplingParams(max_new_tokens=40, ignore_eos=True))
        for i in range(8)
    ]
    tight = {"max_batch_size": 8, "kv_cache_mb": 12 * 16 * 2048 / 2**20}
    plain = tokens_of(make_processor(**tight), requests)
    processor = lookup_processor(make_processor, FlatCosts(), **tight)
    assert processor.layout.num_blocks == 12
    assert run_checked(processor, requests) == plain
    assert processor.get_stats().kv_blocks_used == 0 and processor.get_stats().draft_tokens > 0


def test_cancel_frees_the_draft_models_kv(make_processor: Make, default_model: Path) -> None:
    processor = make_processor(num_speculative_tokens=3, draft_model=str(default_model))
    processor.add_request(0, copying_prompt(1), SamplingParams(max_new_tokens=50))
    for _ in range(4):
        processor.process_step()
    pool = processor.speculator.draft_model.allocator
    assert pool.num_used > 0
    processor.cancel(0)
    assert pool.num_used == 0 and processor.get_stats().kv_blocks_used == 0


def test_resumed_request_continues_exactly_with_speculation(make_processor: Make) -> None:
    ids, params = copying_prompt(3), SamplingParams(max_new_tokens=24, temperature=0.7, seed=5)
    full = tokens_of(make_processor(), [Request("a", ids, params)])["a"]
    processor = lookup_processor(make_processor, FlatCosts())
    processor.add_request(0, ids, params, generated=full[:5])
    rest = []
    while processor.has_work():
        rest += [r.token_id for r in processor.process_step()]
    assert full[:5] + rest == full


def test_lookups_not_worth_verifying_are_judged_for_free(make_processor: Make) -> None:
    requests = mixed_requests()
    plain = tokens_of(make_processor(), requests)
    processor = lookup_processor(make_processor, DearRows())
    speculator = processor.speculator
    alphas: dict[int, list[float]] = {}

    def watch(_: object) -> None:
        for seq, state in speculator._states.items():
            alphas.setdefault(seq.handle, []).append(state.rate.alpha)

    results = run_to_completion(processor, requests, watch)
    assert {k: c.token_ids for k, c in results.items()} == plain
    assert processor.get_stats().draft_tokens == 0  # nothing was verified...
    # ...yet the estimates followed how the lookups fared: this checkpoint repeats itself.
    assert max(a[-1] - a[0] for a in alphas.values()) > 0.3


def test_a_lookup_guess_is_judged_against_the_tokens_that_follow() -> None:
    config = EngineConfig(num_speculative_tokens=4)
    speculator = Speculator(config, max_seq_len=100, backend=select_backend("cpu"))
    speculator.costs = DearRows()
    seq = Sequence(0, [5, 6, 7, 8, 5, 6, 7], SamplingParams(max_new_tokens=20))
    assert speculator._by_prompt_lookup([seq]) == {}  # not worth verifying...
    state = speculator._states[seq]
    assert state.guess == (0, [8, 5, 6, 7])  # ...but remembered
    before = state.rate.alpha
    seq.generated += [8, 5]  # two tokens agree so far: not decided yet
    speculator._by_prompt_lookup([seq])
    assert state.rate.alpha == before and state.guess == (0, [8, 5, 6, 7])
    seq.generated += [1]  # the third does not: 2 of 4 accepted
    speculator._by_prompt_lookup([seq])
    assert state.rate.hits == pytest.approx(0.8 * 1 + 2) and state.rate.trials == pytest.approx(
        0.8 * 2 + 3
    )
    assert state.guess is None or state.guess[0] == 3  # a new guess from here on


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_speculative_tokens": -1}, "num_speculative_tokens must be in [0, 16] (got -1)"),
        ({"num_speculative_tokens": 17}, "num_speculative_tokens must be in [0, 16]"),
        ({"speculative_method": "medusa"}, "speculative_method must be one of ngram, draft"),
        ({"speculative_method": "draft"}, "draft_model must be set with speculative_method"),
        (
            {"speculative_method": "ngram", "draft_model": "m", "num_speculative_tokens": 2},
            "draft_model must be empty with speculative_method ngram",
        ),
        ({"draft_model": "m"}, "draft_model needs num_speculative_tokens > 0"),
        ({"prompt_lookup_min": 0}, "prompt_lookup_min must be >= 1"),
        ({"prompt_lookup_max": 1}, "prompt_lookup_max must be >= prompt_lookup_min (2)"),
    ],
)
def test_engine_config_names_the_bad_speculation_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**overrides)


def test_speculation_is_resolved_from_the_fields() -> None:
    assert EngineConfig().speculation == ""
    assert EngineConfig(num_speculative_tokens=3).speculation == "ngram"
    assert EngineConfig(num_speculative_tokens=3, draft_model="m").speculation == "draft"


def test_a_draft_model_with_another_vocabulary_is_refused(
    make_processor: Make, tmp_path_factory: pytest.TempPathFactory
) -> None:
    big = write_checkpoint(tmp_path_factory.mktemp("models") / "big", "smollm2-135m")
    with pytest.raises(ValueError, match="draft_model: vocabulary of 49152 tokens differs"):
        make_processor(num_speculative_tokens=2, draft_model=str(big))
