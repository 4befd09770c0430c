"""Repetition, frequency and presence penalties on a (rows, vocab) logits array.

Applied to the raw logits, before temperature and the top-k / top-p / min-p
filters (worker/sampling.py), and to greedy rows too, in the order vLLM uses
(`apply_penalties`): the repetition penalty first, then frequency, then presence.

- repetition_penalty p (Hugging Face transformers, RepetitionPenaltyLogitsProcessor;
  Keskar et al. 2019, CTRL): every token id present in the prompt or the
  completion so far has its logit divided by p when positive, multiplied by p
  when negative. Once per token id, however often it occurs. p = 1 is off.
- frequency_penalty f and presence_penalty q (OpenAI's API reference, "Frequency
  and presence penalties"): over the completion only,
  logit[j] -= count[j] * f + (count[j] > 0) * q.

Token counts come from one bincount over the penalised rows' token ids (a
(rows, vocab) array built each step), so no Python loop touches the vocabulary.
A step whose rows are all unpenalised returns the logits untouched, at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.channel.types import SamplingParams

Array = Any


def token_counts(xp: Any, histories: Sequence[Sequence[int]], vocab: int) -> Array:
    """(rows, vocab) int64: how often each token id occurs in each row's history."""
    lengths = [len(h) for h in histories]
    ids = [np.asarray(h, dtype=np.int64) for h in histories if len(h)]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)  # (sum of lengths,)
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)  # (sum of lengths,)
    cells = xp.asarray(rows * vocab + flat)  # one index per (row, token id) occurrence
    counts = xp.bincount(cells, minlength=len(histories) * vocab)  # (rows * vocab,)
    return counts.reshape(len(histories), vocab)


def apply_penalties(
    xp: Any,
    logits: Array,
    prompt_counts: Array,
    output_counts: Array,
    repetition: Array,
    frequency: Array,
    presence: Array,
) -> Array:
    """Penalised copy of `logits` (rows, vocab) float32; counts (rows, vocab); penalties
    float32 (rows,) with 1, 0, 0 as off. See the module docstring for the formulas."""
    seen = (prompt_counts + output_counts) > 0  # (rows, vocab): in prompt or completion
    p = repetition[:, None]  # (rows, 1)
    logits = xp.where(seen, xp.where(logits < 0, logits * p, logits / p), logits)
    counts = output_counts.astype(np.float32)  # (rows, vocab)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0).astype(np.float32)


def penalize(
    xp: Any,
    logits: Array,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> Array:
    """`logits` (rows, vocab) with each row's penalties applied; row r is the next token
    after prompts[r] + outputs[r]. The same array when no row is penalised."""
    rows = [r for r, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    picked = [params[r] for r in rows]

    def column(name: str) -> Array:
        return xp.asarray(np.array([getattr(p, name) for p in picked], dtype=np.float32))

    # The prompt matters only to the repetition penalty: other rows count none of it.
    prompt_ids = [prompts[r] if params[r].repetition_penalty != 1.0 else () for r in rows]
    index = xp.asarray(np.asarray(rows, dtype=np.int64))
    penalised = apply_penalties(
        xp,
        logits[index],
        token_counts(xp, prompt_ids, vocab),
        token_counts(xp, [outputs[r] for r in rows], vocab),
        column("repetition_penalty"),
        column("frequency_penalty"),
        column("presence_penalty"),
    )
    out = logits.copy()  # the model's own output is left as it was
    out[index] = penalised
    return out
