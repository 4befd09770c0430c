"""Speculative decoding on the real default model (SmolLM2-135M-Instruct, the GGUF `make
model` fetches): greedy tokens identical to plain decoding, drafts accepted where the
answer copies the prompt, a batch mixing speculating and plain sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)
from speculation_costs import FlatCosts

from server.prompts import PromptEncoder
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import Checkpoint, load_checkpoint
from worker.engine_core import EngineCore

pytestmark = pytest.mark.timeout(600)  # a busy 2-core machine; ~30 s when quiet

PARAGRAPH = (
    "The cat sat on the mat by the window, watching the birds in the garden. Every morning "
    "the cat waited for the sun to warm the glass, and every evening the cat slept by the fire."
)
CHATS = {
    "copy": f"Rewrite the following paragraph, replacing 'cat' with 'dog':\n\n{PARAGRAPH}",
    "open": "Write a short story about a robot who learns to paint.",
}


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf: Path) -> Checkpoint:
    return load_checkpoint(smollm2_gguf, select_backend("cpu"))


def processor(checkpoint: Checkpoint, **speculation: object) -> BatchProcessor:
    config = EngineConfig(max_batch_size=2, kv_cache_mb=64, device="cpu", **speculation)  # type: ignore[arg-type]
    return BatchProcessor(checkpoint, config, select_backend("cpu"))


@pytest.fixture(scope="module")
def requests(checkpoint: Checkpoint) -> list[Request]:
    encoder = PromptEncoder.from_ready(EngineCore(processor(checkpoint)).ready())
    params = SamplingParams(max_new_tokens=32)
    return [
        Request(name, encoder.encode_chat([{"role": "user", "content": text}]), params)
        for name, text in CHATS.items()
    ]


@pytest.fixture(scope="module")
def plain(checkpoint: Checkpoint, requests: list[Request]) -> dict[str, list[int]]:
    results = run_to_completion(processor(checkpoint), requests)
    return {k: c.token_ids for k, c in results.items()}


def test_prompt_lookup_keeps_the_tokens_and_accepts_the_copied_ones(
    checkpoint: Checkpoint, requests: list[Request], plain: dict[str, list[int]]
) -> None:
    spec = processor(checkpoint, num_speculative_tokens=4)
    spec.speculator.costs = FlatCosts()  # draft whatever is found: independent of timing
    per_step: list[tuple[int, int]] = []  # (decodes, of which drafted)
    propose = spec.speculator.propose

    def spy(batch, scheduler) -> None:
        propose(batch, scheduler)
        per_step.append((len(batch.decodes), len(batch.drafts)))

    spec.speculator.propose = spy  # type: ignore[method-assign]
    by_handle: dict[int, int] = {}  # accepted draft tokens
    record = spec.speculator.record

    def count(seq, drafted: int, accepted: int) -> None:
        by_handle[seq.handle] = by_handle.get(seq.handle, 0) + accepted
        record(seq, drafted, accepted)

    spec.speculator.record = count  # type: ignore[method-assign]
    results = run_to_completion(spec, requests)
    assert {k: c.token_ids for k, c in results.items()} == plain
    stats = spec.get_stats()
    assert stats.accepted_draft_tokens >= 0.5 * stats.draft_tokens > 0
    # The copy's answer repeats the paragraph: most of it came from accepted drafts.
    assert by_handle[0] >= 0.5 * len(plain["copy"])
    assert any(0 < drafted < decodes for decodes, drafted in per_step), "no mixed step"
    assert stats.kv_blocks_used == 0


def test_the_model_drafting_for_itself_keeps_the_tokens(
    checkpoint: Checkpoint, requests: list[Request], plain: dict[str, list[int]], smollm2_gguf
) -> None:
    spec = processor(checkpoint, num_speculative_tokens=3, draft_model=str(smollm2_gguf))
    copy = requests[0]
    short = Request(copy.request_id, copy.prompt_ids, SamplingParams(max_new_tokens=16))
    assert run_to_completion(spec, [short])["copy"].token_ids == plain["copy"][:16]
    stats = spec.get_stats()
    assert stats.accepted_draft_tokens >= 0.9 * stats.draft_tokens > 0
