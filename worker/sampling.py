"""Next-token selection: small pure functions over a (rows, vocab) logits array.

Determinism: the random draw for token i of a request is a uniform number from
NumPy's counter-based Philox generator keyed by the request's seed with
counter i. The token then follows by inverse-CDF over the filtered
distribution, so it depends only on (seed, i, logits): never on the batch it
ran in, nor on where the request ran before a preemption or failover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Array = Any


def draw_uniform(seed: int, index: int) -> float:
    """The uniform in [0, 1) for token `index` of a request seeded with `seed`."""
    return float(np.random.Generator(np.random.Philox(key=seed, counter=index)).random())


def greedy(xp: Any, logits: Array) -> Array:
    return xp.argmax(logits, axis=-1)  # (rows,)


def filtered_probs(
    xp: Any, logits: Array, temperature: Array, top_k: Array, top_p: Array
) -> tuple[Array, Array]:
    """Temperature, then top-k, then top-p over the renormalised top-k mass.

    logits (rows, vocab); temperature/top_p float32 (rows,); top_k int (rows,), 0 = off.
    Returns (order, probs): token ids sorted by descending logit and the kept,
    unnormalised probability of each, both (rows, vocab).
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]  # (rows, vocab)
    order = xp.argsort(-scaled, axis=-1)  # (rows, vocab), most likely first
    ranked = xp.take_along_axis(scaled, order, axis=-1)
    probs = xp.exp(ranked - ranked[:, :1])  # (rows, vocab), un-normalised softmax

    rank = xp.arange(vocab)[None, :]  # (1, vocab)
    k = xp.where(top_k > 0, top_k, vocab)[:, None]  # (rows, 1)
    probs = xp.where(rank < k, probs, np.float32(0))
    probs = probs / probs.sum(axis=-1, keepdims=True)

    # Keep a token while the mass ranked strictly above it is still under top_p.
    mass_before = xp.cumsum(probs, axis=-1) - probs  # (rows, vocab)
    p = xp.where((top_p > 0) & (top_p < 1), top_p, np.float32(2))[:, None]  # 2 = off
    probs = xp.where(mass_before < p, probs, np.float32(0))
    return order, probs


def sample_from(xp: Any, order: Array, probs: Array, uniform: Array) -> Array:
    """Inverse CDF: the first ranked token whose cumulative mass exceeds u * total."""
    cdf = xp.cumsum(probs, axis=-1)  # (rows, vocab)
    threshold = uniform[:, None] * cdf[:, -1:]  # (rows, 1)
    pick = xp.minimum((cdf <= threshold).sum(axis=-1), probs.shape[-1] - 1)  # (rows,)
    return xp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]


def sample(
    xp: Any,
    logits: Array,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    seeds: Sequence[int],
    indices: Sequence[int],
) -> Array:
    """Choose one token id per row (device array); rows with temperature 0 are greedy."""
    temps = np.asarray(temperature, dtype=np.float32)
    chosen = greedy(xp, logits)
    stochastic = np.flatnonzero(temps > 0)
    if stochastic.size:
        rows = xp.asarray(stochastic)
        order, probs = filtered_probs(
            xp,
            logits[rows],
            xp.asarray(temps[stochastic]),
            xp.asarray(np.asarray(top_k, dtype=np.int64)[stochastic]),
            xp.asarray(np.asarray(top_p, dtype=np.float32)[stochastic]),
        )
        uniform = np.array([draw_uniform(seeds[r], indices[r]) for r in stochastic])
        chosen[rows] = sample_from(xp, order, probs, xp.asarray(uniform, dtype=np.float32))
    return chosen
