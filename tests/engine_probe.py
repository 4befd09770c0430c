"""Read the engine's logits, through its real paged paths.

`engine_logits`: `tokens[:prefill_len]` go through chunked prefill (chunks of
`chunk`); the rest are fed one decode step at a time, as generated tokens are.
`record_logits`: the rows every request samples from while the engine runs
as usual (also used by scripts/batch_invariance_probe.py).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from worker.batch_processor import BatchProcessor
from worker.channel.types import SamplingParams
from worker.kv_cache import blocks_for
from worker.scheduler import ScheduledBatch
from worker.sequence import Sequence


def engine_logits(
    processor: BatchProcessor, tokens: list[int], prefill_len: int, chunk: int
) -> np.ndarray:
    """(len(tokens), vocab) logits; row t predicts the token after position t."""
    runner = processor.runner
    seq = Sequence(0, list(tokens[:prefill_len]), SamplingParams(max_new_tokens=len(tokens)))
    blocks = processor.scheduler.block_manager
    seq.block_table = blocks.allocate(blocks_for(len(tokens), runner.block_size))
    rows = []
    try:
        while seq.num_pending:
            n = min(chunk, seq.num_pending)
            step, _ = runner.prepare(ScheduledBatch(prefills=[(seq, n)]))
            step.logits_rows = runner.backend.asarray(np.arange(n))
            rows.append(runner.backend.to_host(runner.model.forward(step, runner.cache)))
            seq.num_computed += n
        for token in tokens[prefill_len:]:
            seq.generated.append(token)
            step, _ = runner.prepare(ScheduledBatch(decodes=[seq]))
            rows.append(runner.backend.to_host(runner.model.forward(step, runner.cache)))
            seq.num_computed += 1
    finally:
        blocks.free(seq.block_table)
    return np.concatenate(rows)


Logits = dict[int, np.ndarray]  # token index -> (vocab,) logits it was sampled from


def record_logits(processor: BatchProcessor) -> dict[int, Logits]:
    """From now on, capture for every request (by handle) the logits row of each token it
    samples; the returned dict fills as the processor steps."""
    runner = processor.runner
    prepare, forward = runner.prepare, runner.model.forward
    recorded: dict[int, Logits] = defaultdict(dict)
    sampled_now: list[Sequence] = []

    def prepare_and_remember(batch: ScheduledBatch):  # type: ignore[no-untyped-def]
        step, sampled = prepare(batch)
        sampled_now[:] = sampled
        return step, sampled

    def forward_and_record(step, cache):  # type: ignore[no-untyped-def]
        logits = forward(step, cache)
        host = runner.backend.to_host(logits)
        for row, seq in enumerate(sampled_now):
            recorded[seq.handle][seq.tokens_generated] = host[row].copy()
        return logits

    runner.prepare = prepare_and_remember  # type: ignore[method-assign]
    runner.model.forward = forward_and_record  # type: ignore[method-assign]
    return recorded
