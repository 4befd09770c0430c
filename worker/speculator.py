"""Speculator: who drafts each step, how many tokens, and what their verification emits.

One engine step with speculation (worker/batch_processor.py):

    batch = scheduler.schedule()
    speculator.propose(batch, scheduler)   # drafts for some decodes, KV slots reserved
    sampled, tokens, logprobs, verified = runner.run(batch, speculator)  # 1 + k rows each
    ... emit each sequence's verified tokens one by one (stop checks), roll its KV back
    speculator.record(seq, drafted, accepted); speculator.observe_step(batch, seconds)

Drafts come from prompt lookup (`ngram`: n-gram matching in the sequence's
own prompt and completion) or from a draft model (`draft`,
worker/draft_model.py). How far each sequence drafts follows
worker/spec_policy.py: for prompt lookup, the expected accepted tokens
against the measured cost of a larger step (so open-ended text, whose
lookups rarely match what follows, runs as plain decodes); for a draft model,
the sequence's own acceptance rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.channel.types import EngineConfig, SamplingParams, TokenLogprob
from worker.checkpoint import load_checkpoint
from worker.draft_model import DraftModel
from worker.kv_cache import KVCacheLayout, blocks_for
from worker.model_config import ModelConfig, kv_bytes_per_token
from worker.penalties import penalize
from worker.sampling import GREEDY_BELOW, sample, token_logprobs
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import Sequence
from worker.spec_policy import (
    AcceptancePolicy,
    AcceptanceRate,
    StepCosts,
    choose_draft_lengths,
)
from worker.speculative import (
    Draft,
    Verified,
    distributions,
    prompt_lookup,
    speculative_draws,
    speculative_verify,
    verify_match,
)

log = logging.getLogger(__name__)

Array = Any


@dataclass
class _SequenceState:
    """What the speculator keeps per sequence."""

    rate: AcceptanceRate  # an AcceptancePolicy for draft-model sequences
    tokens: np.ndarray | None = None  # prompt lookup: prompt + completion so far
    guess: tuple[int, list[int]] | None = None  # an unverified lookup: (first index, tokens)
    drafted: int = 0  # verified draft tokens, and accepted ones (for the log line)
    accepted: int = 0


class Speculator:
    def __init__(self, config: EngineConfig, max_seq_len: int, backend: Backend) -> None:
        self.k = config.num_speculative_tokens
        self.lookup = (config.prompt_lookup_min, config.prompt_lookup_max)
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.draft_model: DraftModel | None = None  # for method "draft"
        self.costs = StepCosts()
        self._states: dict[Sequence, _SequenceState] = {}
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
            speculator.draft_model = DraftModel(
                checkpoint, draft_layout, backend, budget, config.batch_invariant
            )
        log.info(
            "speculative decoding: %s, up to %d draft tokens per sequence per step",
            config.speculation,
            config.num_speculative_tokens,
        )
        return speculator

    # -- drafting ---------------------------------------------------------------------
    def propose(self, batch: ScheduledBatch, scheduler: Scheduler) -> None:
        """Fill batch.drafts for the decodes worth drafting, with KV slots for them."""
        if self.draft_model is not None:
            drafts = self._by_draft_model(batch.decodes)
        else:
            drafts = self._by_prompt_lookup(batch.decodes)
        for seq, draft in drafts.items():
            fit = scheduler.reserve_lookahead(seq, len(draft.tokens)) if draft.tokens else 0
            if fit > 0:
                batch.drafts[seq] = draft.truncated(fit)

    def _limit(self, seq: Sequence) -> int:
        """Most draft tokens for seq: 1 + k emitted tokens must fit max_new_tokens and the
        context."""
        room = min(
            seq.params.max_new_tokens - seq.tokens_generated,
            self.max_seq_len - seq.current_length,
        )
        return min(self.k, room - 1)

    def _by_prompt_lookup(self, decodes: list[Sequence]) -> dict[Sequence, Draft]:
        """Look every decode up; verify the lookups whose expected tokens pay for their rows
        (spec_policy.choose_draft_lengths); the others are judged later, for free, against
        the tokens the sequence goes on to produce."""
        found: dict[Sequence, list[int]] = {}
        offers: dict[Sequence, list[float]] = {}
        for seq in decodes:
            state = self._states.setdefault(seq, _SequenceState(AcceptanceRate()))
            self._catch_up(seq, state)
            limit = self._limit(seq)
            if limit > 0 and state.tokens is not None:
                draft = prompt_lookup(state.tokens, limit, *self.lookup)
                if draft:
                    found[seq], offers[seq] = draft, state.rate.chances(len(draft))
        n = len(decodes)
        lengths = choose_draft_lengths(offers, n, lambda rows: self.costs.estimate(n, rows))
        drafts = {}
        for seq, draft in found.items():
            k = lengths.get(seq, 0)
            if k:
                drafts[seq] = Draft(draft[:k])
            elif self._states[seq].guess is None:
                self._states[seq].guess = (seq.tokens_generated, draft)
        return drafts

    def _catch_up(self, seq: Sequence, state: _SequenceState) -> None:
        """Extend the lookup's token array by seq's new tokens; judge a pending guess."""
        if state.tokens is None:
            state.tokens = np.asarray(seq.tokens, dtype=np.int64)
        elif len(state.tokens) < seq.current_length:
            new = seq.generated[len(state.tokens) - len(seq.prompt_ids) :]
            state.tokens = np.concatenate([state.tokens, np.asarray(new, dtype=np.int64)])
        if state.guess is not None:
            start, guess = state.guess
            seen = seq.generated[start : start + len(guess)]
            matched = 0
            while matched < len(seen) and seen[matched] == guess[matched]:
                matched += 1
            if matched < len(seen) or len(seen) == len(guess):  # decided
                state.rate.update(len(guess), matched)
                state.guess = None

    def _by_draft_model(self, decodes: list[Sequence]) -> dict[Sequence, Draft]:
        """Draft lengths from each sequence's own acceptance (AcceptancePolicy) alone: a
        sampled request's tokens depend on its drafts, so they must not depend on timing."""
        assert self.draft_model is not None
        wants = {}
        for seq in decodes:
            policy = self._states.setdefault(seq, _SequenceState(AcceptancePolicy())).rate
            assert isinstance(policy, AcceptancePolicy)
            limit = self._limit(seq)
            k = policy.draft_length(limit) if limit > 0 else 0
            if k > 0:
                wants[seq] = k
        return self.draft_model.propose(wants) if wants else {}

    def observe_step(self, batch: ScheduledBatch, seconds: float) -> None:
        """The wall time of a step (drafting, forward, verification), for StepCosts."""
        if batch.decodes and not batch.prefills:
            self.costs.observe(len(batch.decodes), batch.num_tokens, seconds)

    # -- verification -----------------------------------------------------------------
    def verify(self, logits: Array, drafts: dict[Sequence, Draft]) -> dict[Sequence, Verified]:
        """Tokens to emit for each drafted sequence (its accepted drafts, then one more),
        with their TokenLogprobs for the requests that ask.

        logits (sum of 1 + k, vocab): each sequence's rows in `drafts` order; row j
        predicts completion token tokens_generated + j. Each row is first penalised as
        plain decoding would penalise that token (the completion so far plus drafts
        1..j), so every row is exactly the distribution plain decoding would see there.
        """
        xp = self.backend.xp
        params, indices, prompts, outputs = [], [], [], []
        for seq, draft in drafts.items():
            rows = len(draft.tokens) + 1
            params += [seq.params] * rows
            indices += range(seq.tokens_generated, seq.tokens_generated + rows)
            prompts += [seq.prompt_ids] * rows
            if seq.params.penalized:
                outputs += [seq.generated + draft.tokens[:j] for j in range(rows)]
            else:
                outputs += [()] * rows  # not read
        logits = penalize(xp, logits, params, prompts, outputs)  # (rows, vocab)
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
        return self._with_logprobs(logits, params, drafts, out)

    def _with_logprobs(
        self,
        logits: Array,
        params: list[SamplingParams],
        drafts: dict[Sequence, Draft],
        out: dict[Sequence, list[int]],
    ) -> dict[Sequence, Verified]:
        """Each emitted token's TokenLogprob, from its own (penalised) row: token j of a
        sequence is drawn at row j, as plain decoding draws it from that distribution."""
        xp = self.backend.xp
        rows: list[int] = []  # verify rows whose emitted token's logprob is asked for
        chosen: list[int] = []
        row = 0
        for seq, draft in drafts.items():
            if seq.params.logprobs:
                rows += range(row, row + len(out[seq]))
                chosen += out[seq]
            row += len(draft.tokens) + 1
        found: list[TokenLogprob | None] = []
        if rows:
            index = xp.asarray(np.asarray(rows, dtype=np.int64))
            found = token_logprobs(
                xp,
                logits[index],
                [params[r] for r in rows],
                xp.asarray(np.asarray(chosen, dtype=np.int64)),
            )  # (len(rows),)
        verified, taken = {}, 0
        for seq, tokens in out.items():
            logprobs: list[TokenLogprob | None] = [None] * len(tokens)
            if seq.params.logprobs:
                logprobs = found[taken : taken + len(tokens)]
                taken += len(tokens)
            verified[seq] = Verified(tokens, logprobs)
        return verified

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
        """A verification of seq's drafts: `accepted` of `drafted` tokens were."""
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        state = self._states[seq]
        state.drafted += drafted
        state.accepted += accepted
        state.rate.update(drafted, accepted)

    def release(self, seq: Sequence) -> None:
        """A sequence left the engine: log its acceptance, free its draft state."""
        state = self._states.pop(seq, None)
        if self.draft_model is not None:
            self.draft_model.release(seq)
        if state is not None and state.drafted:
            log.info(
                "request handle %d: %d of %d draft tokens accepted (%.0f%%)",
                seq.handle,
                state.accepted,
                state.drafted,
                100 * state.accepted / state.drafted,
            )
