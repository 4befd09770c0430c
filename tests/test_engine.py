"""BatchProcessor: cached decode, batching invariance, preemption, stopping, capacity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from dense_reference import dense_forward
from engine_probe import engine_logits

from worker.batch_processor import Request, run_to_completion
from worker.channel.types import FinishReason, Priority, SamplingParams


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, size=n).tolist()


def mixed_requests() -> list[Request]:
    """8 requests: greedy and seeded sampling, lengths across block and chunk sizes."""
    specs = [
        (1, SamplingParams(max_new_tokens=12, ignore_eos=True)),
        (7, SamplingParams(max_new_tokens=20, temperature=0.9, seed=11, ignore_eos=True)),
        (40, SamplingParams(max_new_tokens=9, temperature=1.3, top_k=40, seed=5, ignore_eos=True)),
        (70, SamplingParams(max_new_tokens=16, ignore_eos=True)),
        (
            16,
            SamplingParams(max_new_tokens=25, temperature=0.7, top_p=0.8, seed=3, ignore_eos=True),
        ),
        (33, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, top_p=0.9, seed=9)),
        (3, SamplingParams(max_new_tokens=30, ignore_eos=True)),
        (50, SamplingParams(max_new_tokens=14, temperature=2.0, seed=2**63 + 5, ignore_eos=True)),
    ]
    priorities = [Priority.NORMAL, Priority.LOW, Priority.HIGH, Priority.NORMAL] * 2
    return [
        Request(f"r{i}", prompt(n, seed=i), params, priorities[i])
        for i, (n, params) in enumerate(specs)
    ]


def tokens_of(results: dict) -> dict[str, list[int]]:
    return {rid: c.token_ids for rid, c in results.items()}


def test_chunked_prefill_and_cached_decode_match_dense_forward(make_processor) -> None:
    processor = make_processor()
    tokens = prompt(70, seed=4)
    got = engine_logits(processor, tokens, prefill_len=45, chunk=16)  # 3 chunks, 25 decodes
    want = dense_forward(processor.model_config, processor.runner.model.weights, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_greedy_generation_matches_dense_forward(make_processor) -> None:
    processor = make_processor()
    request = Request("g", prompt(20, seed=8), SamplingParams(max_new_tokens=10, ignore_eos=True))
    got = run_to_completion(processor, [request])["g"].token_ids
    tokens = list(request.prompt_ids)
    for _ in range(10):
        logits = dense_forward(processor.model_config, processor.runner.model.weights, tokens)
        tokens.append(int(logits[-1].argmax()))
    assert got == tokens[20:]


def test_tokens_identical_alone_batched_and_under_preemption(make_processor) -> None:
    requests = mixed_requests()
    alone = {}
    for r in requests:
        alone.update(tokens_of(run_to_completion(make_processor(max_batch_size=1), [r])))
    batched = make_processor(max_batch_size=8)
    together = tokens_of(run_to_completion(batched, requests))
    assert together == alone
    assert batched.get_stats().preemptions == 0


def test_preemption_by_recompute_loses_and_repeats_nothing(make_processor) -> None:
    # Short prompts, long outputs: all 8 are admitted (1 block each) into a 12-block pool,
    # then their growth (3-4 blocks each) forces decodes to preempt one another.
    requests = [
        Request(
            f"p{i}",
            prompt(2 + i, seed=20 + i),
            dataclasses.replace(r.params, max_new_tokens=44 + 2 * i),
        )
        for i, r in enumerate(mixed_requests())
    ]
    alone = {}
    for r in requests:
        alone.update(tokens_of(run_to_completion(make_processor(max_batch_size=1), [r])))
    tight = make_processor(max_batch_size=8, kv_cache_mb=12 * 16 * 2048 / 2**20)
    assert tight.layout.num_blocks == 12
    squeezed = tokens_of(run_to_completion(tight, requests))
    assert tight.get_stats().preemptions >= 3
    assert squeezed == alone
    assert tight.get_stats().kv_blocks_used == 0


def test_resumed_request_continues_exactly(make_processor) -> None:
    for params in (
        SamplingParams(max_new_tokens=16, ignore_eos=True),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True),
    ):
        ids = prompt(23, seed=1)
        full = run_to_completion(make_processor(), [Request("a", ids, params)])["a"].token_ids
        processor = make_processor()
        processor.add_request(0, ids, params, generated=full[:5])
        rest = []
        while processor.has_work():
            rest += [e.token_id for e in processor.process_step()]
        assert full[:5] + rest == full


def test_long_prompt_prefills_in_chunks_without_stalling_decodes(make_processor) -> None:
    processor = make_processor(prefill_token_budget=16)
    decoder = SamplingParams(max_new_tokens=40, ignore_eos=True)
    short, long = 0, 1
    processor.add_request(short, prompt(3), decoder)
    processor.process_step()  # "short" is now decoding
    processor.add_request(long, prompt(200, seed=2), SamplingParams(max_new_tokens=2))
    steps_until_long_token = 0
    short_tokens = 0
    while True:
        records = processor.process_step()
        steps_until_long_token += 1
        short_tokens += sum(r.handle == short for r in records)
        if any(r.handle == long for r in records):
            break
    assert steps_until_long_token == 200 // 16 + 1  # 13 chunks of <= 16 tokens
    assert short_tokens == steps_until_long_token  # one token every step meanwhile


def test_finish_reasons(make_processor) -> None:
    processor = make_processor()
    ids = prompt(10, seed=3)
    base = run_to_completion(
        processor, [Request("base", ids, SamplingParams(max_new_tokens=8, ignore_eos=True))]
    )["base"]
    assert base.finish_reason == FinishReason.LENGTH and len(base.token_ids) == 8
    marker = base.token_ids[3]
    first = base.token_ids.index(marker)

    stop = SamplingParams(max_new_tokens=8, stop_token_ids=(marker,))
    got = run_to_completion(processor, [Request("stop", ids, stop)])["stop"]
    assert got.token_ids == base.token_ids[: first + 1] and got.finish_reason == FinishReason.STOP

    processor.model_config = dataclasses.replace(processor.model_config, eos_token_ids=(marker,))
    eos = run_to_completion(processor, [Request("eos", ids, SamplingParams(max_new_tokens=8))])
    assert eos["eos"].token_ids == base.token_ids[: first + 1]
    assert eos["eos"].finish_reason == FinishReason.EOS
    ignore = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert (
        run_to_completion(processor, [Request("i", ids, ignore)])["i"].token_ids == base.token_ids
    )

    short_ctx = make_processor(max_seq_len=14)
    ctx = run_to_completion(short_ctx, [Request("ctx", ids, ignore)])["ctx"]
    assert ctx.token_ids == base.token_ids[:4] and ctx.finish_reason == FinishReason.LENGTH


def test_admission_waits_for_a_slot_and_blocks_in_priority_order(make_processor) -> None:
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    processor = make_processor(max_batch_size=2)
    for handle in range(3):
        processor.add_request(handle, prompt(5, seed=handle), params)
    processor.process_step()
    stats = processor.get_stats()
    assert (stats.running, stats.waiting, stats.free_slots) == (2, 1, 0)
    assert [s.handle for s in processor.scheduler.waiting] == [2]

    small = make_processor(kv_cache_mb=8 * 16 * 2048 / 2**20)  # 8 blocks
    small.add_request(0, prompt(64), params)  # 4 blocks
    small.process_step()
    # (Prompts differ: a shared prefix would need fewer blocks, tests/test_prefix_cache.py.)
    small.add_request(1, prompt(64, seed=1), params)  # 4 more would leave no watermark: waits
    small.add_request(2, prompt(16), params)  # would fit, but may not jump ahead of 1
    small.add_request(3, prompt(16), params, Priority.HIGH)  # a higher class goes first
    small.process_step()
    assert [s.handle for s in small.scheduler.running] == [0, 3]
    assert [s.handle for s in small.scheduler.waiting] == [1, 2]
    while small.has_work():
        small.process_step()
    assert small.get_stats().kv_blocks_used == 0


def test_cancel_frees_slot_and_blocks_at_once(make_processor) -> None:
    processor = make_processor()
    processor.add_request(7, prompt(40), SamplingParams(max_new_tokens=50))
    processor.add_request(8, prompt(4), SamplingParams(max_new_tokens=50), Priority.LOW)
    processor.process_step()  # 32 of 7's 40 prompt tokens (the prefill budget)
    processor.process_step()  # the rest of 7 and all of 8: one token each
    before = processor.get_stats()
    assert before.running == 2 and before.kv_blocks_used == 4
    record = processor.cancel(7)
    assert record is not None and record.finish_reason == FinishReason.CANCELLED
    assert record.handle == 7 and record.index == 1
    after = processor.get_stats()
    assert after.running == 1 and after.kv_blocks_used == 1
    assert processor.cancel(7) is None
    assert all(r.handle == 8 for r in processor.process_step())


def test_cancel_of_a_waiting_request(make_processor) -> None:
    processor = make_processor(max_batch_size=1)
    processor.add_request(1, prompt(5), SamplingParams(max_new_tokens=50))
    processor.add_request(2, prompt(5), SamplingParams(max_new_tokens=50))
    processor.process_step()
    record = processor.cancel(2)
    assert record is not None and record.index == 0
    assert processor.get_stats().waiting == 0


@pytest.mark.parametrize(
    ("ids", "params", "message"),
    [
        ([], SamplingParams(), "prompt_token_ids must not be empty"),
        ([5, 512], SamplingParams(), "token id 512 is outside [0, 512)"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens must be > 0"),
        (list(range(1, 300)), SamplingParams(), "context limit of 256"),
        ([1, 2], SamplingParams(max_new_tokens=100_000), "exceed the KV cache"),
        ([1], SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty must be finite and > 0"),
        ([1], SamplingParams(repetition_penalty=float("nan")), "repetition_penalty must be"),
    ],
)
def test_invalid_requests_name_the_field(make_processor, ids, params, message) -> None:
    processor = make_processor(max_seq_len=256, kv_cache_mb=0.25)  # 128 tokens
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        processor.add_request(0, ids, params)
    assert processor.get_stats().kv_blocks_used == 0


def test_stats_track_tokens_and_utilization(make_processor) -> None:
    processor = make_processor(max_batch_size=4)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for i in range(2):
        processor.add_request(i, prompt(8, seed=i), params)
    processor.process_step()
    stats = processor.get_stats()
    assert stats.utilization == 0.5 and stats.total_tokens == 2
    while processor.has_work():
        processor.process_step()
    stats = processor.get_stats()
    assert stats.total_tokens == 10 and stats.running == 0 and stats.kv_blocks_used == 0
