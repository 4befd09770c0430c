"""Read the engine's logits at every position, through its real paged paths.

`tokens[:prefill_len]` go through chunked prefill (chunks of `chunk`); the rest
are fed one decode step at a time, as generated tokens are.
"""

from __future__ import annotations

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
