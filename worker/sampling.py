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

Log-probabilities (`token_logprobs`, only for rows whose request asks) are those
of the distribution the token was drawn from before truncation:
log_softmax(logits / T) over the whole vocabulary, on the logits after the
penalties (worker/penalties.py) and the temperature T, but before top-k, top-p
and min-p; for greedy rows (T below GREEDY_BELOW) T counts as 1, i.e. the
log-softmax of the (penalised) logits, the model's own distribution. So the
sampled token's value and its alternatives' are finite and do not change when a
filter is tightened (a filtered token would otherwise read -inf, which JSON
cannot carry), matching vLLM's processed log-probs without the truncation; with
no penalty and T = 1 they are the raw model distribution that OpenAI reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.channel.types import SamplingParams, TokenLogprob

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


def log_softmax(xp: Any, logits: Array, temperature: Array) -> Array:
    """log_softmax(logits / temperature) per row: (rows, vocab) float32, temperature (rows,)."""
    top = logits.max(axis=-1, keepdims=True)  # (rows, 1)
    scaled = (logits - top) / temperature[:, None]  # (rows, vocab), as filtered_probs scales
    return scaled - xp.log(xp.exp(scaled).sum(axis=-1, keepdims=True))  # max(scaled) = 0


def top_tokens(xp: Any, values: Array, k: int) -> tuple[Array, Array]:
    """The k largest of each row, largest first (ties: lower id first): (ids, values),
    both (rows, k); k >= 1."""
    ids = xp.argpartition(-values, k - 1, axis=-1)[:, :k]  # (rows, k), unordered
    ids = xp.sort(ids, axis=-1)  # so that the stable sort below puts tied ids in order
    picked = xp.take_along_axis(values, ids, axis=-1)
    order = xp.argsort(-picked, axis=-1, kind="stable")  # (rows, k)
    return xp.take_along_axis(ids, order, axis=-1), xp.take_along_axis(picked, order, axis=-1)


def token_logprobs(
    xp: Any, logits: Array, params: Sequence[SamplingParams], chosen: Array
) -> list[TokenLogprob | None]:
    """Row r's TokenLogprob (see the module docstring) when params[r].logprobs, else None.

    logits (rows, vocab), after the penalties; chosen (rows,) the sampled ids. Only
    the asking rows are computed; two device-to-host copies of (rows', 1 + k).
    """
    rows = [r for r, p in enumerate(params) if p.logprobs]
    out: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return out
    asked = [params[r] for r in rows]
    index = xp.asarray(np.asarray(rows, dtype=np.int64))
    temperature = [1.0 if _greedy(p) else min(p.temperature, MAX_TEMPERATURE) for p in asked]
    logprobs = log_softmax(
        xp, logits[index], xp.asarray(np.array(temperature, dtype=np.float32))
    )  # (rows', vocab)
    tokens = chosen[index][:, None]  # (rows', 1)
    values = xp.take_along_axis(logprobs, tokens, axis=-1)  # (rows', 1)
    k = max(p.top_logprobs for p in asked)
    if k:
        top_ids, top_values = top_tokens(xp, logprobs, k)  # (rows', k) each
        tokens = xp.concatenate([tokens, top_ids.astype(tokens.dtype)], axis=-1)  # (rows', 1+k)
        values = xp.concatenate([values, top_values], axis=-1)  # (rows', 1 + k)
    host_ids, host_values = _to_host(tokens).tolist(), _to_host(values).tolist()
    for i, (r, p) in enumerate(zip(rows, asked, strict=True)):
        ids, lps = host_ids[i], host_values[i]
        top = tuple(zip(ids[1 : 1 + p.top_logprobs], lps[1 : 1 + p.top_logprobs], strict=True))
        out[r] = TokenLogprob(ids[0], lps[0], top)
    return out


def _greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def _to_host(array: Array) -> np.ndarray:
    """A device array on the host (CuPy's .get(); NumPy's as it is)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)
