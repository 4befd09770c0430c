"""DraftModel: a smaller model sharing the target's tokenizer, proposing k tokens per sequence.

It lives in the same worker with its own ModelRunner: its own LlamaModel and
its own paged KV pool and allocator. For each target sequence it keeps a
shadow Sequence (the same prompt and completion, its own block table and
num_computed). A proposal, for all drafting sequences at once:

1. sync: the shadow keeps the prefix of its tokens the target agrees with
   (last step's accepted drafts) and takes the new ones; K/V past that prefix
   is dropped (num_computed shrinks), like the target's rollback;
2. one forward over each shadow's pending tokens (1 + the accepted drafts
   after a verify; the prompt the first time, a budget of tokens per step),
   sampling d_1 from the last row;
3. k - 1 batched single-token decodes, sampling d_2..d_k.

Greedy requests draft greedily (point masses); sampled ones draw d_j from the
draft's filtered distribution q_j (same temperature, top-k, top-p, min-p) with
the plain sampler's draw for that token (worker/speculative.py explains the
draws), and q_j is kept for the acceptance test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.block_manager import BlockManager
from worker.checkpoint import Checkpoint
from worker.kv_cache import KVCacheLayout, blocks_for
from worker.model_runner import ModelRunner
from worker.penalties import penalize
from worker.sampling import GREEDY_BELOW, draw_uniform, greedy, sample_from
from worker.scheduler import ScheduledBatch
from worker.sequence import Sequence
from worker.speculative import Draft, distributions

Array = Any


@dataclass
class _Shadow:
    seq: Sequence  # the draft model's copy: own block table and num_computed
    synced: int  # completion tokens known to agree with the target's


class DraftModel:
    def __init__(
        self,
        checkpoint: Checkpoint,
        layout: KVCacheLayout,
        backend: Backend,
        budget: int,
        batch_invariant: bool = False,
    ) -> None:
        """`budget`: tokens of its prompt one sequence's shadow may catch up on per step
        (per sequence, so a sequence's drafts never depend on the others in its batch);
        `batch_invariant`: its logits bitwise independent of the batch, as the model's."""
        self.runner = ModelRunner(checkpoint, layout, backend, batch_invariant)
        # Its own pool's bookkeeping; no prefix caching (a shadow's K/V is rolled back often).
        self.allocator = BlockManager(layout.num_blocks, layout.block_size, False)
        self.block_size = layout.block_size
        self.context = checkpoint.config.max_position_embeddings
        self.budget = budget
        self.xp = backend.xp
        self._shadows: dict[Sequence, _Shadow] = {}

    def release(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence: its draft KV blocks go back."""
        shadow = self._shadows.pop(seq, None)
        if shadow is not None:
            self.allocator.free(shadow.seq.block_table)

    def propose(self, wants: dict[Sequence, int]) -> dict[Sequence, Draft]:
        """Draft up to wants[seq] tokens for each sequence; a sequence still catching up on
        its prompt, or whose draft KV does not fit, gets none this step."""
        chunks: list[tuple[Sequence, int]] = []
        lengths: dict[Sequence, int] = {}  # shadow -> draft length
        owners: dict[Sequence, Sequence] = {}  # shadow -> target sequence
        for seq, k in wants.items():
            shadow = self._sync(seq)
            pending = shadow.num_pending
            if shadow.current_length + k - 1 > self.context:
                continue
            if pending > self.budget:  # a long prompt: catch up over several steps first
                if self._fit(shadow, shadow.num_computed + self.budget):
                    chunks.append((shadow, self.budget))
                continue
            if not self._fit(shadow, shadow.current_length + k - 1):
                continue
            chunks.append((shadow, pending))
            lengths[shadow], owners[shadow] = k, seq
        if not chunks:
            return {}

        probs: dict[Sequence, list[Array]] = {s: [] for s in lengths}
        # Step 1: the pending tokens; rows of the shadows that reach their end give d_1.
        step, sampled = self.runner.prepare(ScheduledBatch(prefills=chunks))
        logits = self.runner.model.forward(step, self.runner.cache)  # (S, vocab)
        for shadow, chunk in chunks:
            shadow.num_computed += chunk
        active = sampled  # exactly the shadows that drafted: a cut-short chunk ends no prompt
        self._append(active, logits, probs)
        # Steps 2..k: one batched decode each, for the shadows that want more.
        for j in range(2, max(lengths.values(), default=0) + 1):
            active = [s for s in active if lengths[s] >= j]
            step, _ = self.runner.prepare(ScheduledBatch(decodes=active))
            logits = self.runner.model.forward(step, self.runner.cache)  # (len(active), vocab)
            for shadow in active:
                shadow.num_computed += 1
            self._append(active, logits, probs)

        drafts = {}
        for shadow, k in lengths.items():
            rows = probs[shadow]
            q = self.xp.stack(rows) if rows else None  # (k, vocab) for sampled requests
            drafts[owners[shadow]] = Draft(list(shadow.generated[-k:]), q)
        return drafts

    # -- helpers ----------------------------------------------------------------------
    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of seq, holding seq's tokens; K/V kept only where they agree."""
        entry = self._shadows.get(seq)
        if entry is None:
            shadow = Sequence(seq.handle, seq.prompt_ids, seq.params, generated=list(seq.generated))
            self._shadows[seq] = _Shadow(shadow, len(seq.generated))
            return shadow
        shadow, real = entry.seq, seq.generated
        agree = entry.synced  # last step's drafts start here; keep those the target accepted
        while (
            agree < min(len(real), len(shadow.generated)) and shadow.generated[agree] == real[agree]
        ):
            agree += 1
        del shadow.generated[agree:]
        shadow.generated.extend(real[agree:])
        shadow.num_computed = min(shadow.num_computed, len(shadow.prompt_ids) + agree)
        entry.synced = len(real)
        return shadow

    def _fit(self, shadow: Sequence, num_tokens: int) -> bool:
        """Hold exactly the blocks for `num_tokens` K/V entries; False if the pool is short."""
        table, need = shadow.block_table, blocks_for(num_tokens, self.block_size)
        if len(table) > need:
            self.allocator.free(table[need:])
            del table[need:]
        elif len(table) < need:
            if self.allocator.num_free < need - len(table):
                return False
            table.extend(self.allocator.allocate(need - len(table)))
        return True

    def _append(
        self, shadows: list[Sequence], logits: Array, probs: dict[Sequence, list[Array]]
    ) -> None:
        """Sample each shadow's next draft token from its logits row (rows, vocab); append it.

        The token is completion index len(shadow.generated) of its request: a sampled
        request draws it with the plain sampler's draw for that index (draw_uniform). The
        request's penalties apply as in the model (its history: the shadow's tokens, drafts
        included), so a draft model close to the model drafts what the model picks.
        """
        if not shadows:
            return
        xp = self.xp
        logits = penalize(
            xp,
            logits,
            [s.params for s in shadows],
            [s.prompt_ids for s in shadows],
            [s.generated for s in shadows],
        )  # (rows, vocab), the same array when no row is penalised
        tokens = greedy(xp, logits)  # (rows,)
        stochastic = [r for r, s in enumerate(shadows) if s.params.temperature >= GREEDY_BELOW]
        if stochastic:
            rows = xp.asarray(np.array(stochastic))
            chosen = [shadows[r] for r in stochastic]
            order, ranked, dense = distributions(xp, logits[rows], [s.params for s in chosen])
            draws = [draw_uniform(s.params.seed, len(s.generated)) for s in chosen]
            tokens[rows] = sample_from(xp, order, ranked, xp.asarray(np.array(draws, np.float32)))
            for n, shadow in enumerate(chosen):
                probs[shadow].append(dense[n])
        for shadow, token in zip(
            shadows, self.runner.backend.to_host(tokens).tolist(), strict=True
        ):
            shadow.generated.append(int(token))
