"""ModelRunner.prepare: where each token of a step goes, checked array by array.

The batch is built by hand (no scheduler): its sequences hold block tables out of
order, so a mix-up between a table index and a block id shows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from worker.batch_processor import BatchProcessor
from worker.channel.types import SamplingParams
from worker.model import StepInputs
from worker.model_runner import ModelRunner
from worker.scheduler import ScheduledBatch
from worker.sequence import Sequence


@pytest.fixture
def runner(make_processor: Callable[..., BatchProcessor]) -> ModelRunner:
    processor = make_processor()
    assert processor.runner.block_size == 16
    return processor.runner


def sequence(
    handle: int, prompt_len: int, generated: list[int], computed: int, table: list[int]
) -> Sequence:
    prompt = [100 + handle * 50 + i for i in range(prompt_len)]  # distinct ids per sequence
    s = Sequence(handle, prompt, SamplingParams(), generated=list(generated))
    s.num_computed, s.block_table = computed, list(table)
    return s


def host(runner: ModelRunner, step: StepInputs) -> dict[str, np.ndarray]:
    names = ("token_ids", "positions", "slot_blocks", "slot_offsets", "logits_rows")
    return {name: runner.backend.to_host(getattr(step, name)) for name in names}


def test_decodes_first_then_prefill_chunks(runner: ModelRunner) -> None:
    # Two decodes: one with generated tokens, one whose last prompt token is still pending.
    d1 = sequence(0, 20, [7, 9], computed=21, table=[5, 2])  # token 9 at position 21
    d2 = sequence(1, 40, [], computed=39, table=[7, 0, 3])  # its last prompt token, at 39
    # Two prefill chunks: the middle of a prompt, and a whole recompute (prompt + generated).
    p1 = sequence(2, 40, [], computed=16, table=[9, 4, 6])  # positions 16..31, not the end
    p2 = sequence(3, 10, [11, 12], computed=0, table=[8])  # positions 0..11, the end: sampled
    batch = ScheduledBatch(decodes=[d1, d2], prefills=[(p1, 16), (p2, 12)])

    step, sampled = runner.prepare(batch)
    got = host(runner, step)

    want_ids = [9, d2.prompt_ids[-1], *p1.prompt_ids[16:32], *p2.prompt_ids, 11, 12]
    assert got["token_ids"].tolist() == want_ids
    want_pos = [21, 39, *range(16, 32), *range(12)]
    assert got["positions"].tolist() == want_pos
    assert got["slot_offsets"].tolist() == [p % 16 for p in want_pos]
    want_blocks = [2, 3] + [4] * 16 + [8] * 12  # table[position // 16] of each row's sequence
    assert got["slot_blocks"].tolist() == want_blocks
    assert got["token_ids"].dtype == got["positions"].dtype == np.int64

    assert step.num_decode == 2
    assert step.decode_kv_blocks == 3
    tables = runner.backend.to_host(step.decode_tables)
    assert tables.tolist() == [[5, 2, 0], [7, 0, 3]]  # padded with zeros to the longest

    first, second = step.prefills
    assert (first.start, first.end, first.num_kv_blocks) == (2, 18, 2)  # rows; prefix + chunk
    assert runner.backend.to_host(first.block_table).tolist() == [[9, 4]]
    assert (second.start, second.end, second.num_kv_blocks) == (18, 30, 1)
    assert runner.backend.to_host(second.block_table).tolist() == [[8]]

    # Rows sampled: both decodes, and the last row of the chunk that ends its sequence.
    assert got["logits_rows"].tolist() == [0, 1, 29]
    assert sampled == [d1, d2, p2]


def test_prefill_only_and_decode_only_steps(runner: ModelRunner) -> None:
    p = sequence(0, 40, [], computed=0, table=[3, 1, 2])
    step, sampled = runner.prepare(ScheduledBatch(prefills=[(p, 33)]))  # into a third block
    got = host(runner, step)
    assert step.num_decode == 0 and step.decode_tables is None and step.decode_kv_blocks == 0
    assert got["slot_blocks"].tolist() == [3] * 16 + [1] * 16 + [2]
    assert step.prefills[0].num_kv_blocks == 3
    assert got["logits_rows"].tolist() == [] and sampled == []  # 7 prompt tokens still to go

    d = sequence(1, 16, [4], computed=16, table=[6, 5])  # the first token of its second block
    step, sampled = runner.prepare(ScheduledBatch(decodes=[d]))
    got = host(runner, step)
    assert got["token_ids"].tolist() == [4] and got["positions"].tolist() == [16]
    assert (got["slot_blocks"].tolist(), got["slot_offsets"].tolist()) == ([5], [0])
    assert step.prefills == [] and step.decode_kv_blocks == 2
    assert got["logits_rows"].tolist() == [0] and sampled == [d]
