"""ModelRunner: turns a ScheduledBatch into device arrays, runs the model, samples.

Host-side bookkeeping (which token goes where in the paged cache) is built here
with NumPy and shipped to the device once per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from worker.attention import check_batch_invariance
from worker.backend import Backend
from worker.channel.types import TokenLogprob
from worker.checkpoint import Checkpoint
from worker.kv_cache import KVCache, KVCacheLayout, blocks_for
from worker.matmul import check_weight_invariance
from worker.model import LlamaModel, PrefillSegment, StepInputs
from worker.penalties import penalize
from worker.sampling import sample, token_logprobs
from worker.scheduler import ScheduledBatch
from worker.sequence import Sequence

if TYPE_CHECKING:
    from worker.speculative import Verified
    from worker.speculator import Speculator

Array = Any


class ModelRunner:
    def __init__(
        self,
        checkpoint: Checkpoint,
        layout: KVCacheLayout,
        backend: Backend,
        batch_invariant: bool = False,
    ) -> None:
        self.backend = backend
        self.config = checkpoint.config
        self.model = LlamaModel(checkpoint.config, checkpoint.weights, backend, batch_invariant)
        if batch_invariant:  # fails at start, naming the shape, on a BLAS that breaks a rule
            check_weight_invariance(backend.xp, self.model.weight_shapes())
            check_batch_invariance(backend.xp, checkpoint.config.head_dim, layout.block_size)
        self.cache = KVCache(checkpoint.config, layout, backend)
        self.block_size = layout.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
        """Lay the step's tokens out (decodes first) and find the rows to sample."""
        bs, to_dev = self.block_size, self.backend.asarray
        ids: list[int] = []
        positions: list[np.ndarray] = []
        tables: list[np.ndarray] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []

        for seq in batch.decodes:
            if seq in batch.drafts:
                continue  # verified below, as a chunk of 1 + k queries
            ids.append(seq.generated[-1] if seq.generated else seq.prompt_ids[-1])
            positions.append(np.array([seq.num_computed]))
            tables.append(np.asarray(seq.block_table, dtype=np.int64))
            logits_rows.append(len(ids) - 1)
            sampled.append(seq)

        num_decode = len(ids)
        decode_tables = None
        decode_kv_blocks = 0
        if num_decode:
            decode_kv_blocks = max(len(t) for t in tables)
            padded = np.zeros((len(tables), decode_kv_blocks), dtype=np.int64)
            for row, table in enumerate(tables):
                padded[row, : len(table)] = table
            decode_tables = to_dev(padded)

        segments = []
        for seq, chunk in batch.prefills:
            start, end = seq.num_computed, seq.num_computed + chunk
            row = len(ids)
            ids.extend(seq.tokens[start:end])
            positions.append(np.arange(start, end))
            table = np.asarray(seq.block_table, dtype=np.int64)
            tables.append(table)
            used = blocks_for(end, bs)
            segments.append(PrefillSegment(row, row + chunk, to_dev(table[None, :used]), used))
            if end == seq.current_length:  # chunk completes the sequence: sample its next token
                logits_rows.append(row + chunk - 1)
                sampled.append(seq)

        # Speculative decoding: a decode with k draft tokens is a chunk of 1 + k queries at
        # the end of its cached prefix, every row's logits wanted (after the sampled rows).
        for seq, draft in batch.drafts.items():
            start, row = seq.num_computed, len(ids)
            ids.append(seq.generated[-1] if seq.generated else seq.prompt_ids[-1])
            ids.extend(draft.tokens)
            end = start + len(ids) - row
            positions.append(np.arange(start, end))
            table = np.asarray(seq.block_table, dtype=np.int64)
            tables.append(table)
            used = blocks_for(end, bs)
            segments.append(PrefillSegment(row, len(ids), to_dev(table[None, :used]), used))
            logits_rows.extend(range(row, len(ids)))

        pos = np.concatenate(positions)  # (T,)
        blocks = np.concatenate(
            [t[p // bs] for t, p in zip(tables, positions, strict=True)]
        )  # (T,) the block each new token's K/V goes to
        step = StepInputs(
            token_ids=to_dev(np.asarray(ids, dtype=np.int64)),
            positions=to_dev(pos),
            slot_blocks=to_dev(blocks),
            slot_offsets=to_dev(pos % bs),
            num_decode=num_decode,
            decode_tables=decode_tables,
            decode_kv_blocks=decode_kv_blocks,
            prefills=segments,
            logits_rows=to_dev(np.asarray(logits_rows, dtype=np.int64)),
        )
        return step, sampled

    def run(
        self, batch: ScheduledBatch, speculator: Speculator | None = None
    ) -> tuple[list[Sequence], np.ndarray, list[TokenLogprob | None], dict[Sequence, Verified]]:
        """One forward pass and sampling: the sampled sequences, their tokens, each one's
        TokenLogprob (None where its request did not ask for logprobs), and for each decode
        with drafts (batch.drafts) what its verification emits."""
        step, sampled = self.prepare(batch)
        logits = self.model.forward(step, self.cache)  # (S + verify rows, vocab)
        verified = {}
        if batch.drafts:
            assert speculator is not None, "drafts need the speculator that verifies them"
            verified = speculator.verify(logits[len(sampled) :], batch.drafts)
        if not sampled:
            return sampled, np.empty(0, dtype=np.int64), [], verified
        xp = self.backend.xp
        params = [s.params for s in sampled]
        logits = penalize(
            xp,
            logits[: len(sampled)],
            params,
            [s.prompt_ids for s in sampled],
            [s.generated for s in sampled],
        )  # (S, vocab), the same array when no row is penalised
        tokens = sample(xp, logits, params, indices=[s.tokens_generated for s in sampled])
        logprobs = token_logprobs(xp, logits, params, tokens)  # [None] * S when none asks
        return sampled, self.backend.to_host(tokens).astype(np.int64), logprobs, verified
