"""Batch invariance: with `batch_invariant`, a request's logits are bitwise the
same alone, inside batches of 2, 8 and 32 other requests in every phase, after
preemption and recompute, under any prefill chunking, and when resumed from its
generated tokens on another engine (docs/batch-invariance.md).

Every comparison is exact (`np.array_equal` on float32 logits), on the random
checkpoints and on the real default model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from engine_probe import Logits, record_logits
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)

from worker.attention import paged_attention
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import Checkpoint, load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
TARGET = 0  # the handle of the request whose logits are compared


def make(model: Path | Checkpoint, **overrides: object) -> BatchProcessor:
    """A batch-invariant engine; a loaded Checkpoint is shared (its weights are read-only)."""
    config: dict[str, object] = dict(
        max_batch_size=64, kv_cache_mb=16, prefill_token_budget=48, device="cpu"
    )
    config.update(batch_invariant=True, **overrides)
    engine = EngineConfig(**config)  # type: ignore[arg-type]
    if isinstance(model, Checkpoint):
        return BatchProcessor(model, engine, select_backend("cpu"))
    return BatchProcessor.from_model_dir(model, engine)


def prompt(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    return rng.integers(1, vocab, size=length).tolist()


def target_params(seeded: bool, max_new_tokens: int = 10) -> SamplingParams:
    if seeded:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True
        )
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)


def run_target(
    processor: BatchProcessor,
    target_prompt: list[int],
    params: SamplingParams,
    others: Sequence[list[int]] = (),
    others_at_step: int = 0,
    target_at_step: int = 0,
    generated: list[int] | None = None,
) -> tuple[Logits, list[int]]:
    """Run the target with `others` (added at `others_at_step`); its logits and tokens."""
    recorded = record_logits(processor)
    step = 0
    pending = [(target_at_step, TARGET, target_prompt, params, generated)]
    rng = np.random.default_rng(len(others))
    for i, other in enumerate(others, start=1):
        # Others decode for different lengths, so they finish and join at different steps.
        other_params = SamplingParams(max_new_tokens=int(rng.integers(1, 20)), ignore_eos=True)
        pending.append((others_at_step + i % 3, i, other, other_params, None))
    tokens: dict[int, int] = {}
    while pending or processor.has_work():
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            _, handle, ids, p, gen = item
            processor.add_request(handle, ids, p, generated=gen)
        for record in processor.process_step():
            if record.handle == TARGET:
                tokens[record.index] = record.token_id
        step += 1
    return recorded[TARGET], [tokens[i] for i in sorted(tokens)]


def assert_same(reference: Logits, logits: Logits) -> None:
    assert sorted(logits) == sorted(reference)
    for index in reference:
        assert np.array_equal(logits[index], reference[index]), (
            f"token {index}: logits differ (max |diff| "
            f"{np.abs(logits[index] - reference[index]).max():.3g})"
        )


@pytest.fixture(scope="module")
def toy_models() -> dict[str, Path]:
    return {name: FIXTURES / name for name in ("llama_gqa", "llama_mqa_tied", "mistral")}


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("count", [2, 8, 32])
def test_alone_equals_inside_batches(default_model: Path, count: int, seeded: bool) -> None:
    rng = np.random.default_rng(count)
    target = prompt(rng, 512, 37)
    others = [prompt(rng, 512, int(n)) for n in rng.integers(1, 90, size=count)]
    params = target_params(seeded)
    alone, alone_tokens = run_target(make(default_model), target, params)
    # Others arrive first (the target prefills while they decode) and later (they
    # prefill, in chunks, while the target decodes).
    for others_at, target_at in [(0, 2), (3, 0)]:
        logits, tokens = run_target(
            make(default_model), target, params, others, others_at, target_at
        )
        assert tokens == alone_tokens
        assert_same(alone, logits)


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa_tied", "mistral"])
def test_other_architectures(toy_models: dict[str, Path], name: str) -> None:
    """GQA, multi-query with a tied head, and a sliding window (mistral, window 24)."""
    model = toy_models[name]
    rng = np.random.default_rng(1)
    target = prompt(rng, 320, 30)
    others = [prompt(rng, 320, int(n)) for n in rng.integers(1, 60, size=8)]
    params = target_params(False, max_new_tokens=24)  # past the window
    alone, _ = run_target(make(model), target, params)
    logits, _ = run_target(make(model), target, params, others, others_at_step=1)
    assert_same(alone, logits)


@pytest.mark.parametrize("budget", [5, 16, 33, 512])
def test_chunked_prefill_budget_does_not_matter(default_model: Path, budget: int) -> None:
    rng = np.random.default_rng(3)
    target = prompt(rng, 512, 70)
    params = target_params(False)
    reference, _ = run_target(make(default_model, prefill_token_budget=512), target, params)
    logits, _ = run_target(make(default_model, prefill_token_budget=budget), target, params)
    assert_same(reference, logits)


def test_preemption_and_recompute(default_model: Path) -> None:
    """A pool too small for everyone: the target is preempted, recomputed, and identical."""
    rng = np.random.default_rng(4)
    target = prompt(rng, 512, 40)
    others = [prompt(rng, 512, 40) for _ in range(6)]
    params = target_params(True, max_new_tokens=30)
    reference, tokens = run_target(make(default_model), target, params)
    # Room for ~3 of the 7 sequences at their longest: the youngest get preempted.
    small = make(default_model, kv_cache_mb=0.35, block_size=4, prefill_token_budget=64)
    logits, small_tokens = run_target(small, target, params, others, target_at_step=1)
    assert small.scheduler.num_preemptions > 0
    assert small_tokens == tokens
    assert_same(reference, logits)


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_resumed_on_another_engine(default_model: Path, seeded: bool) -> None:
    """A request resumed from its generated tokens (a crash) continues bit for bit."""
    rng = np.random.default_rng(5)
    target = prompt(rng, 512, 25)
    params = target_params(seeded, max_new_tokens=16)
    reference, tokens = run_target(make(default_model), target, params)
    others = [prompt(rng, 512, int(n)) for n in rng.integers(1, 60, size=8)]
    for cut in (1, 7, 15):
        logits, rest = run_target(
            make(default_model), target, params, others, others_at_step=0, generated=tokens[:cut]
        )
        assert rest == tokens[cut:]
        assert_same({i: reference[i] for i in range(cut, 16)}, logits)


def test_real_model(smollm2_gguf: Path) -> None:
    """SmolLM2-135M-Instruct: alone, inside a batch of 5 in both phases, and resumed."""
    rng = np.random.default_rng(6)
    vocab = 49152
    target = prompt(rng, vocab, 20)
    others = [prompt(rng, vocab, int(n)) for n in rng.integers(2, 40, size=5)]
    params = target_params(False, max_new_tokens=6)
    model = load_checkpoint(smollm2_gguf, select_backend("cpu"))
    alone, tokens = run_target(make(model, kv_cache_mb=64), target, params)
    logits, batched = run_target(
        make(model, kv_cache_mb=64), target, params, others, others_at_step=1
    )
    assert batched == tokens
    assert_same(alone, logits)
    resumed, rest = run_target(
        make(model, kv_cache_mb=64), target, params, others, generated=tokens[:3]
    )
    assert rest == tokens[3:]
    assert_same({i: alone[i] for i in range(3, 6)}, resumed)


# -- the attention kernel alone ------------------------------------------------------
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_attention_row_same_as_decode_or_in_any_chunk(heads: int, kv_heads: int) -> None:
    """A query's output equals whether it is a decode (alone or batched with longer
    sequences) or any row of a prefill chunk of any size."""
    rng = np.random.default_rng(heads + kv_heads)
    block, dim, length = 4, 8, 23
    pool_k = rng.standard_normal((64, block, kv_heads, dim)).astype(np.float32)
    pool_v = rng.standard_normal((64, block, kv_heads, dim)).astype(np.float32)
    table = np.arange(6, dtype=np.int64)[None, :]  # the sequence's 23 keys in blocks 0-5
    q = rng.standard_normal((1, length, heads, dim)).astype(np.float32)
    positions = np.arange(length)[None, :]

    def attend(q_rows, tables, pos, num_blocks):  # type: ignore[no-untyped-def]
        return paged_attention(
            np, q_rows, pool_k, pool_v, tables, pos, num_blocks, 0.3, None, 16, True
        )

    whole = attend(q, table, positions, 6)[0]  # (23, H, D): one chunk
    for chunk_start in (0, 5, 22):  # the last rows as a later chunk
        part = attend(q[:, chunk_start:], table, positions[:, chunk_start:], 6)[0]
        assert np.array_equal(part, whole[chunk_start:])
    longer = np.arange(6, 20, dtype=np.int64)  # another sequence, 14 blocks
    tables = np.stack([np.pad(table[0], (0, 8)), longer])
    decode = attend(
        np.stack([q[0, 22:], q[0, 22:]]), tables, np.array([[22], [55]]), 14
    )  # (2, 1, H, D): the last query as a decode beside a longer sequence
    assert np.array_equal(decode[0, 0], whole[22])
    alone = attend(q[:, 22:], table, positions[:, 22:], 6)
    assert np.array_equal(alone[0, 0], whole[22])


def test_flag_reaches_the_engine(make_processor: Callable[..., BatchProcessor]) -> None:
    assert make_processor(batch_invariant=True).runner.model.batch_invariant
    assert not make_processor().runner.model.batch_invariant


def test_prefix_cache_hit_changes_no_bit(default_model: Path) -> None:
    """A prompt whose first blocks come from the prefix cache (computed for another request,
    in another batch) gives the logits of a run that computes everything itself."""
    rng = np.random.default_rng(8)
    shared = prompt(rng, 512, 48)  # three 16-token blocks
    target = shared + prompt(rng, 512, 9)
    params = target_params(True)
    reference, tokens = run_target(make(default_model, prefix_caching=False), target, params)
    engine = make(default_model)
    others = [shared + prompt(rng, 512, int(n)) for n in (3, 20)]
    run_to_completion(
        engine, [Request(f"o{i}", ids, target_params(False)) for i, ids in enumerate(others)]
    )
    logits, cached_tokens = run_target(engine, target, params)
    assert engine.scheduler.block_manager.hit_tokens >= 48  # the target's 3 blocks at least
    assert cached_tokens == tokens
    assert_same(reference, logits)
