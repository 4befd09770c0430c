"""Next-token selection: small pure functions over a (rows, vocab) logits array.

Order of the filters, as in Hugging Face transformers' logits warpers
(TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper):
temperature, then top-k, then top-p over the renormalised top-k mass, then
min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"), which keeps
tokens whose probability is at least min_p times the most likely one's.

Determinism: the random draw for token i of a request is a uniform number from
NumPy's counter-based Philox generator keyed by the request's seed with
counter i. The token then follows by inverse-CDF over the filtered
distribution, so it depends only on (seed, i, logits): never on the batch it
ran in, nor on whether it was preempted or resumed with `generated` tokens.

Numerical safety over the whole accepted range of every float parameter
(validation accepts temperature >= 0 and finite, top_p and min_p in [0, 1]):

- temperature below GREEDY_BELOW (1e-5) is greedy, exactly as temperature 0:
  such a distribution is a point mass on the most likely token up to float
  rounding, and dividing by a subnormal (1e-39) would overflow float32.
  Above it, logits have their row maximum subtracted before the division, so
  every scaled value is <= 0 and exp() never overflows; a temperature above
  float32's range (from HTTP's float64) is clipped to MAX_TEMPERATURE.
- top_p and min_p are used as float32; tiny values (1e-38, subnormals) keep only
  the most likely token (and its exact ties), values just under 1 (1 - 1e-7)
  keep (nearly) everything. Each filter keeps a prefix of the ranking by
  construction, so rounding in a cumulative sum can never leave a hole, and
  the pick is always a kept token. No parameter value can produce NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.channel.types import SamplingParams

Array = Any

GREEDY_BELOW = 1e-5  # temperatures in [0, GREEDY_BELOW) pick the most likely token
MAX_TEMPERATURE = 1e30  # larger ones (float32 overflows at 3.4e38) are this: uniform


def draw_uniform(seed: int, index: int) -> float:
    """The uniform in [0, 1) for token `index` of a request seeded with `seed`."""
    return float(np.random.Generator(np.random.Philox(key=seed, counter=index)).random())


def greedy(xp: Any, logits: Array) -> Array:
    return xp.argmax(logits, axis=-1)  # (rows,)


def filtered_probs(
    xp: Any, logits: Array, temperature: Array, top_k: Array, top_p: Array, min_p: Array
) -> tuple[Array, Array]:
    """Temperature, top-k, top-p, min-p (see the module docstring).

    logits (rows, vocab); temperature, top_p, min_p float32 (rows,); top_k int
    (rows,); top_k 0, top_p 1 and min_p 0 are off. Returns (order, probs):
    token ids sorted by descending logit and the kept, unnormalised
    probability of each, both (rows, vocab).
    """
    vocab = logits.shape[-1]
    # Subtract the row maximum first: every scaled value is <= 0, so nothing overflows
    # for any temperature >= GREEDY_BELOW (see the module docstring).
    top = logits.max(axis=-1, keepdims=True)  # (rows, 1)
    scaled = (logits - top) / temperature[:, None]  # (rows, vocab)
    order = xp.argsort(-scaled, axis=-1)  # (rows, vocab), most likely first
    ranked = xp.take_along_axis(scaled, order, axis=-1)
    probs = xp.exp(ranked - ranked[:, :1])  # (rows, vocab), un-normalised softmax, probs[:, 0] = 1

    rank = xp.arange(vocab)[None, :]  # (1, vocab)
    k = xp.where(top_k > 0, top_k, vocab)[:, None]  # (rows, 1)
    probs = xp.where(rank < k, probs, np.float32(0))
    probs = probs / probs.sum(axis=-1, keepdims=True)

    # Keep a token while the mass ranked strictly above it is still under top_p.
    mass_before = xp.cumsum(probs, axis=-1) - probs  # (rows, vocab)
    p = xp.where((top_p > 0) & (top_p < 1), top_p, np.float32(2))[:, None]  # 2 = off
    # Float32 rounding can make mass_before dip; keep the prefix before the first cut.
    cut = xp.cumsum(mass_before >= p, axis=-1) > 0
    probs = xp.where(cut, np.float32(0), probs)

    # Min-p: relative to the most likely token (column 0, never filtered above).
    probs = xp.where(probs >= min_p[:, None] * probs[:, :1], probs, np.float32(0))
    return order, probs


def sample_from(xp: Any, order: Array, probs: Array, uniform: Array) -> Array:
    """Inverse CDF: the first ranked token whose cumulative mass exceeds u * total.

    The kept tokens are a prefix of the ranking (every filter keeps the most
    likely ones), so the pick is clamped to the last kept token: a uniform that
    rounds up to 1.0 in float32 still picks a token the filters kept.
    """
    cdf = xp.cumsum(probs, axis=-1)  # (rows, vocab)
    threshold = uniform[:, None] * cdf[:, -1:]  # (rows, 1)
    kept = (probs > 0).sum(axis=-1)  # (rows,) >= 1: the most likely token is always kept
    pick = xp.minimum((cdf <= threshold).sum(axis=-1), kept - 1)  # (rows,)
    return xp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]


def sample(
    xp: Any, logits: Array, params: Sequence[SamplingParams], indices: Sequence[int]
) -> Array:
    """One token id per row (device array); row r uses params[r] and is token indices[r].

    Rows with temperature below GREEDY_BELOW (0 included) are greedy; the others'
    parameter arrays are built here.
    """
    stochastic = [r for r, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    chosen = greedy(xp, logits)  # (rows,)
    if stochastic:
        rows = [params[r] for r in stochastic]

        def column(name: str, dtype: type) -> Array:
            return xp.asarray(np.array([getattr(p, name) for p in rows], dtype=dtype))

        temperature = [min(p.temperature, MAX_TEMPERATURE) for p in rows]
        order, probs = filtered_probs(
            xp,
            logits[xp.asarray(stochastic)],
            xp.asarray(np.array(temperature, dtype=np.float32)),
            column("top_k", np.int64),
            column("top_p", np.float32),
            column("min_p", np.float32),
        )
        uniform = [draw_uniform(params[r].seed, indices[r]) for r in stochastic]
        picked = sample_from(xp, order, probs, xp.asarray(np.array(uniform, dtype=np.float32)))
        chosen[xp.asarray(stochastic)] = picked
    return chosen
