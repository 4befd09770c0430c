"""Speculator: who drafts each step, how many tokens, and what their verification emits.

One engine step with speculation (worker/batch_processor.py):

    batch = scheduler.schedule()
    speculator.propose(batch, scheduler)   # drafts for some decodes, KV slots reserved
    sampled, tokens, verified = runner.run(batch)   # decodes with drafts: 1 + k rows each
    ... emit each sequence's verified tokens one by one (stop checks), roll its KV back
    speculator.record(seq, drafted, accepted)

Drafts come from prompt lookup (`ngram`: n-gram matching in the sequence's
own prompt and completion) or from a draft model (`draft`,
worker/draft_model.py). Which sequences draft, and how far, follows each
sequence's recent acceptance (`AcceptancePolicy`), so a request whose drafts
keep failing (open-ended text) soon runs as a plain decode again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.channel.types import EngineConfig
from worker.checkpoint import load_checkpoint
from worker.kv_cache import KVCacheLayout, blocks_for
from worker.model_config import ModelConfig, kv_bytes_per_token
from worker.sampling import GREEDY_BELOW, sample
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import Sequence
from worker.speculative import (
    Draft,
    distributions,
    prompt_lookup,
    speculative_draws,
    speculative_verify,
    verify_match,
)

log = logging.getLogger(__name__)

Array = Any


@dataclass
class AcceptancePolicy:
    """Per sequence: how many tokens to draft, from the recent acceptance rate.

    `alpha` estimates the chance that a draft token is accepted given that the
    one before it was: accepted drafts over drafts examined (the accepted ones
    plus the first rejected), with older verifications' weight decaying by
    DECAY. The j-th draft token is accepted with chance about alpha^j, so the
    draft stops where that falls under MIN_CHANCE: each extra row of the
    verify pass has to pay for itself. Below MIN_CHANCE for even one token
    the sequence stops drafting for `cooldown` steps, doubling (up to
    MAX_COOLDOWN) while the probes after it fail.
    """

    DECAY = 0.8
    MIN_CHANCE = 0.4
    MAX_COOLDOWN = 64

    hits: float = 1.0  # prior: alpha = 1/2, worth two draft tokens
    trials: float = 2.0
    cooldown: int = 0
    backoff: int = 0
    drafted: int = 0  # totals, for the request's log line
    accepted: int = 0

    @property
    def alpha(self) -> float:
        return self.hits / self.trials

    def draft_length(self, limit: int) -> int:
        """Draft tokens for this step (0 = plain decode); `limit` >= 0 caps it."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        k, chance = 1, self.alpha  # at least one: a probe after a cooldown
        while k < limit and chance * self.alpha >= self.MIN_CHANCE:
            k, chance = k + 1, chance * self.alpha
        return min(k, limit)

    def update(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.hits = self.DECAY * self.hits + accepted
        self.trials = self.DECAY * self.trials + accepted + (accepted < drafted)
        if self.alpha < self.MIN_CHANCE:
            self.backoff = min(max(2 * self.backoff, 1), self.MAX_COOLDOWN)
            self.cooldown = self.backoff
        else:
            self.backoff = 0


class Speculator:
    def __init__(self, config: EngineConfig, max_seq_len: int, backend: Backend) -> None:
        self.k = config.num_speculative_tokens
        self.lookup = (config.prompt_lookup_min, config.prompt_lookup_max)
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.draft_model: Any = None  # worker.draft_model.DraftModel for method "draft"
        self._policy: dict[Sequence, AcceptancePolicy] = {}
        self._tokens: dict[Sequence, np.ndarray] = {}  # prompt lookup: each sequence's tokens
        self.draft_tokens = 0  # totals since start, reported in Status
        self.accepted_tokens = 0

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        target: ModelConfig,
        layout: KVCacheLayout,
        max_seq_len: int,
        backend: Backend,
    ) -> Speculator:
        """Speculation as configured; loads the draft model for method "draft".

        ValueError (naming draft_model) when the draft model's vocabulary differs.
        """
        speculator = cls(config, max_seq_len, backend)
        if config.speculation == "draft":
            from worker.draft_model import DraftModel  # only workers that use one load it

            checkpoint = load_checkpoint(config.draft_model, backend)
            if checkpoint.config.vocab_size != target.vocab_size:
                raise ValueError(
                    f"draft_model: vocabulary of {checkpoint.config.vocab_size} tokens differs "
                    f"from the model's {target.vocab_size} (the draft must share the tokenizer)"
                )
            # As many tokens as the target's pool, plus every slot's drafts.
            extra = blocks_for(config.num_speculative_tokens, layout.block_size)
            blocks = layout.num_blocks + config.max_batch_size * extra
            per_token = kv_bytes_per_token(checkpoint.config, np.dtype(np.float32).itemsize)
            draft_layout = KVCacheLayout(blocks, layout.block_size, per_token)
            log.info("draft model %s; %s", checkpoint.config.name, draft_layout.describe())
            budget = config.prefill_token_budget
            speculator.draft_model = DraftModel(checkpoint, draft_layout, backend, budget)
        log.info(
            "speculative decoding: %s, up to %d draft tokens per sequence per step",
            config.speculation,
            config.num_speculative_tokens,
        )
        return speculator

    # -- drafting ---------------------------------------------------------------------
    def propose(self, batch: ScheduledBatch, scheduler: Scheduler) -> None:
        """Fill batch.drafts for the decodes worth drafting, with KV slots for them."""
        wants: dict[Sequence, int] = {}
        for seq in batch.decodes:
            # Every emitted token must fit max_new_tokens and the context: 1 + k of them.
            room = min(
                seq.params.max_new_tokens - seq.tokens_generated,
                self.max_seq_len - seq.current_length,
            )
            k = min(self.k, room - 1)
            if k > 0:
                k = self._policy.setdefault(seq, AcceptancePolicy()).draft_length(k)
            if k > 0:
                wants[seq] = k
        if not wants:
            return
        if self.draft_model is not None:
            drafts = self.draft_model.propose(wants)
        else:
            drafts = {seq: Draft(self._lookup(seq, k)) for seq, k in wants.items()}
        for seq, draft in drafts.items():
            fit = scheduler.reserve_lookahead(seq, len(draft.tokens)) if draft.tokens else 0
            if fit > 0:
                batch.drafts[seq] = draft.truncated(fit)

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        """Prompt lookup over seq's tokens, kept as an array grown by the new tokens only."""
        tokens = self._tokens.get(seq)
        if tokens is None:
            tokens = self._tokens[seq] = np.asarray(seq.tokens, dtype=np.int64)
        elif len(tokens) < seq.current_length:
            new = np.asarray(seq.generated[len(tokens) - len(seq.prompt_ids) :], dtype=np.int64)
            tokens = self._tokens[seq] = np.concatenate([tokens, new])
        return prompt_lookup(tokens, k, *self.lookup)

    # -- verification -----------------------------------------------------------------
    def verify(self, logits: Array, drafts: dict[Sequence, Draft]) -> dict[Sequence, list[int]]:
        """Tokens to emit for each drafted sequence (its accepted drafts, then one more).

        logits (sum of 1 + k, vocab): each sequence's rows in `drafts` order; row j
        predicts completion token tokens_generated + j.
        """
        xp = self.backend.xp
        params, indices = [], []
        for seq, draft in drafts.items():
            params += [seq.params] * (len(draft.tokens) + 1)
            indices += range(seq.tokens_generated, seq.tokens_generated + len(draft.tokens) + 1)
        # What plain decoding picks at every row (its argmax, or its seeded draw).
        target = self.backend.to_host(sample(xp, logits, params, indices)).tolist()
        out: dict[Sequence, list[int]] = {}
        row = 0
        for seq, draft in drafts.items():
            k = len(draft.tokens)
            if draft.probs is None or seq.params.temperature < GREEDY_BELOW:
                out[seq] = verify_match(draft.tokens, target[row : row + k + 1])
            else:
                out[seq] = self._verify_sampled(
                    seq, draft, logits[row : row + k + 1], target[row + k]
                )
            row += k + 1
        return out

    def _verify_sampled(self, seq: Sequence, draft: Draft, logits: Array, bonus: int) -> list[int]:
        """Speculative sampling against the draft model's q (rows: (k + 1, vocab) logits)."""
        k, to_host = len(draft.tokens), self.backend.to_host
        _, _, p = distributions(self.backend.xp, logits, [seq.params] * (k + 1))
        first = seq.tokens_generated
        draws = [speculative_draws(seq.params.seed, first + j) for j in range(k)]
        resample, accept = [d[0] for d in draws], [d[1] for d in draws]
        return speculative_verify(
            to_host(p), to_host(draft.probs), draft.tokens, accept, resample, bonus
        )

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self._policy[seq].update(drafted, accepted)

    def release(self, seq: Sequence) -> None:
        """A sequence left the engine: log its acceptance, free its draft state."""
        policy = self._policy.pop(seq, None)
        self._tokens.pop(seq, None)
        if self.draft_model is not None:
            self.draft_model.release(seq)
        if policy is not None and policy.drafted:
            log.info(
                "request handle %d: %d of %d draft tokens accepted (%.0f%%)",
                seq.handle,
                policy.accepted,
                policy.drafted,
                100 * policy.accepted / policy.drafted,
            )
