"""Speculative decoding: drafting by prompt lookup, and verification of drafts.

Small pure functions; the engine-facing parts (who drafts, KV slots, stats)
are in worker/speculator.py, the draft model in worker/draft_model.py.

A decoding sequence with k draft tokens d_1..d_k is verified in one target
forward pass over k + 1 query rows: row j (j = 0..k) gives the target's
distribution p_j for the token after d_j (d_0 = the last real token). Two
acceptance rules, both exact (the emitted tokens are distributed as plain
decoding's):

- `verify_match`, for greedy requests and for point-mass drafts (prompt
  lookup, or a greedy draft model): t_j is what plain decoding picks at row
  j (the argmax, or the seeded sampler with its own draw for that token);
  drafts are accepted while d_{j+1} == t_j, and the first t_j that differs
  (or t_k after k accepted drafts) is emitted too. For a draft that is a
  point mass q = delta(d), this *is* speculative sampling: d is accepted with
  probability p(d) = min(1, p(d)/q(d)), and on rejection the token is p
  conditioned on != d, i.e. the normalised residual max(0, p - q). Realised
  with the sampler's own draw, so the tokens are exactly plain decoding's.
- `speculative_verify`, for a sampled draft model q: Leviathan et al. 2023,
  "Fast Inference from Transformers via Speculative Decoding" (Algorithm 1),
  and Chen et al. 2023, "Accelerating Large Language Model Decoding with
  Speculative Sampling": accept d_j with probability min(1, p(d_j)/q(d_j)); on
  rejection sample from norm(max(0, p - q)); after k acceptances sample one
  more token from p_k.

Random draws: token i of a request draws from the Philox stream keyed by its
seed with counter i; worker/sampling.py `draw_uniform` is draw 0 of it, the
plain sampler's. The draft model samples its token i with that same draw 0
(so a draft model close to the target drafts what plain sampling would pick,
and the output stays close to plain decoding's); speculative sampling takes
draws 1 (the residual sample) and 2 (the acceptance test) of the same stream.
A Philox block holds four 64-bit words, so draws 0-3 of token i never meet
another token's, and the three uniforms one verification uses are
independent: a seeded request's output is a pure function of (seed, drafts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.channel.types import SamplingParams, TokenLogprob
from worker.sampling import MAX_TEMPERATURE, filtered_probs

Array = Any

RESAMPLE_DRAW = 1  # draw of token i's stream that samples the residual after a rejection
ACCEPT_DRAW = 2  # draw that decides whether the draft for token i is accepted


@dataclass
class Draft:
    """Proposed next tokens of one sequence: `tokens` (k,), and the draft model's
    distributions `probs` (k, vocab) they were sampled from; None for a point mass."""

    tokens: list[int]
    probs: Array | None = None

    def truncated(self, k: int) -> Draft:
        return Draft(self.tokens[:k], None if self.probs is None else self.probs[:k])


@dataclass
class Verified:
    """What one sequence's verification emits: its accepted drafts then one more token
    (a + 1 tokens), and each token's TokenLogprob (None where the request did not ask)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


def speculative_draws(seed: int, index: int) -> tuple[float, float]:
    """(residual draw, acceptance draw) for token `index` of a request seeded with `seed`:
    draws 1 and 2 of the Philox stream whose draw 0 is sampling.draw_uniform(seed, index)."""
    words = np.random.Generator(np.random.Philox(key=seed, counter=index)).random(3)
    return float(words[RESAMPLE_DRAW]), float(words[ACCEPT_DRAW])


def distributions(
    xp: Any, logits: Array, params: Sequence[SamplingParams]
) -> tuple[Array, Array, Array]:
    """The filtered next-token distributions of sampled rows, normalised.

    The filters and their order are worker/sampling.py's (`filtered_probs`,
    with the temperature clipped to MAX_TEMPERATURE as `sample` does); only for
    rows with temperature >= GREEDY_BELOW. logits (rows, vocab). Returns
    (order, ranked, dense), each (rows, vocab): token ids most likely first,
    their probabilities in that order, and the probabilities by token id.
    """

    def column(values: list[float], dtype: type) -> Array:
        return xp.asarray(np.array(values, dtype=dtype))

    order, probs = filtered_probs(
        xp,
        logits,
        column([min(p.temperature, MAX_TEMPERATURE) for p in params], np.float32),
        column([p.top_k for p in params], np.int64),
        column([p.top_p for p in params], np.float32),
        column([p.min_p for p in params], np.float32),
    )
    ranked = probs / probs.sum(axis=-1, keepdims=True)  # (rows, vocab)
    dense = xp.zeros_like(ranked)
    dense[xp.arange(ranked.shape[0])[:, None], order] = ranked  # (rows, vocab) by token id
    return order, ranked, dense


# -- drafting by prompt lookup ---------------------------------------------------------
def prompt_lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram.

    tokens (L,) int: the sequence so far (prompt + completion). The suffix of
    length n (max_n down to min_n) is searched in tokens[:-1]; the most recent
    match of the longest n wins, and the draft is what followed it, copied on
    into the draft itself when the match is near the end (so a repeating loop
    drafts its continuation). [] when nothing matches. Prompt lookup
    decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`).
    """
    length = len(tokens)
    if k < 1 or length < min_n + 1:
        return []
    # Candidate end positions e (the match is tokens[e-n+1 : e+1]) for n = 1, then
    # narrowed one token further back at a time; e <= length - 2 leaves a token after it.
    ends = np.flatnonzero(tokens[: length - 1] == tokens[-1])  # (M,)
    best: np.ndarray | None = ends if min_n <= 1 else None
    for n in range(2, min(max_n, length - 1) + 1):
        ends = ends[ends >= n - 1]
        ends = ends[tokens[ends - (n - 1)] == tokens[length - n]]
        if ends.size == 0:
            break
        if n >= min_n:
            best = ends
    if best is None or best.size == 0:
        return []
    start = int(best[-1]) + 1
    # An overlapping copy (LZ77-style): a match close to the end continues into the
    # suffix itself, so a loop of period P < k still drafts k tokens.
    period = length - start
    return [int(tokens[start + i % period]) for i in range(k)]


# -- verification ----------------------------------------------------------------------
def verify_match(draft: Sequence[int], target: Sequence[int]) -> list[int]:
    """Tokens to emit: the drafts that plain decoding would also pick, then its own next one.

    draft (k,); target (k + 1,): the token plain decoding picks at each row.
    Returns a + 1 tokens for a accepted drafts (draft[:a] + [target[a]]).
    """
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return [*draft[:accepted], int(target[accepted])]


def sample_residual(p: np.ndarray, q: np.ndarray, uniform: float) -> int:
    """Inverse-CDF sample (token-id order) from norm(max(0, p - q)); p, q (vocab,).

    Falls back to p when rounding leaves no residual mass (p == q, so a
    rejection had probability 0 up to rounding).
    """
    residual = np.maximum(p - q, 0.0)  # (vocab,)
    if not residual.sum() > 0:
        residual = p
    cdf = np.cumsum(residual, dtype=np.float64)  # (vocab,)
    pick = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    last_kept = int(np.flatnonzero(residual > 0)[-1])  # u * total rounding up to total
    return min(pick, last_kept)


def speculative_verify(
    p: np.ndarray,
    q: np.ndarray,
    draft: Sequence[int],
    accept_draws: Sequence[float],
    resample_draws: Sequence[float],
    bonus: int,
) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

    p (k + 1, vocab): the target's normalised distributions at the k + 1 rows;
    q (k, vocab): the draft's, draft[j] ~ q[j]; accept_draws, resample_draws
    (k,) uniforms in [0, 1); bonus: a token drawn from p[k] (the plain
    sampler's pick at that row). Returns the a accepted drafts then one token:
    the residual sample at the first rejection, else `bonus`.
    """
    out: list[int] = []
    for j, token in enumerate(draft):
        # Accept with probability min(1, p/q): u < p/q, written without dividing.
        if accept_draws[j] * q[j, token] < p[j, token]:
            out.append(int(token))
            continue
        out.append(sample_residual(p[j], q[j], resample_draws[j]))
        return out
    out.append(int(bonus))
    return out
