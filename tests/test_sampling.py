"""Sampling: pure functions of (logits, params, seed, index)."""

from __future__ import annotations

import numpy as np

from worker.channel.types import SamplingParams
from worker.sampling import draw_uniform, filtered_probs, sample, sample_from

PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # token 1 most likely, then 3, 2, 0
LOGITS = np.log(PROBS).astype(np.float32)[None]  # (1, vocab)


def quantile_counts(logits: np.ndarray, n: int, **params: float) -> np.ndarray:
    """Sample with n evenly spaced uniforms: token frequencies equal the kept probabilities."""
    rows = np.repeat(logits, n, axis=0)
    order, probs = filtered_probs(
        np,
        rows,
        np.full(n, params.get("temperature", 1.0), dtype=np.float32),
        np.full(n, int(params.get("top_k", 0))),
        np.full(n, params.get("top_p", 1.0), dtype=np.float32),
        np.full(n, params.get("min_p", 0.0), dtype=np.float32),
    )
    uniform = ((np.arange(n) + 0.5) / n).astype(np.float32)
    tokens = sample_from(np, order, probs, uniform)
    return np.bincount(tokens, minlength=logits.shape[-1]) / n


def test_uniform_draw_is_a_pure_function_of_seed_and_index() -> None:
    first = draw_uniform(7, 3)
    draws = {draw_uniform(7, i) for i in range(100)} | {draw_uniform(8, 0)}
    assert draw_uniform(7, 3) == first  # whatever was drawn in between
    assert len(draws) == 101
    assert all(0.0 <= u < 1.0 for u in draws)


def test_frequencies_follow_the_distribution() -> None:
    np.testing.assert_allclose(quantile_counts(LOGITS, 1000), PROBS, atol=2e-3)


def test_temperature_sharpens_and_flattens() -> None:
    cold = quantile_counts(LOGITS, 1000, temperature=0.5)
    want = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(cold, want, atol=2e-3)
    hot = quantile_counts(LOGITS, 1000, temperature=100.0)
    assert hot.min() > 0.23


def test_top_k_keeps_the_k_most_likely_renormalised() -> None:
    counts = quantile_counts(LOGITS, 1000, top_k=2)
    np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=2e-3)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Ranked mass: 0.5, 0.8, 0.95, 1.0 -> p=0.7 keeps tokens 1 and 3.
    counts = quantile_counts(LOGITS, 1000, top_p=0.7)
    np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=2e-3)
    assert quantile_counts(LOGITS, 100, top_p=0.01)[1] == 1.0  # always at least one token
    np.testing.assert_allclose(quantile_counts(LOGITS, 1000, top_p=1.0), PROBS, atol=2e-3)


def test_top_p_applies_to_the_top_k_mass() -> None:
    # top_k=3 renormalises the ranked mass to 0.526, 0.842, 1.0, so p=0.83 drops token 2
    # (over the full distribution the mass before it is 0.8 < 0.83 and it would stay)
    counts = quantile_counts(LOGITS, 1000, top_k=3, top_p=0.83)
    np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=2e-3)


def reference_min_p(logits: np.ndarray, temperature: float, min_p: float) -> np.ndarray:
    """Dense min-p, written from its definition: softmax(logits / T), drop p < min_p * max p."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    kept = np.where(p >= min_p * p.max(), p, 0.0)
    return kept / kept.sum()


def test_min_p_keeps_tokens_within_a_fraction_of_the_most_likely() -> None:
    # p = 0.05, 0.5, 0.15, 0.3: min_p 0.5 keeps p >= 0.25 (tokens 1, 3); 0.2 keeps p >= 0.1.
    for min_p, want in ((0.5, [0, 0.5 / 0.8, 0, 0.3 / 0.8]), (0.2, [0, 0.5, 0.15, 0.3])):
        np.testing.assert_allclose(
            reference_min_p(LOGITS[0], 1.0, min_p), np.array(want) / sum(want)
        )
        np.testing.assert_allclose(
            quantile_counts(LOGITS, 2000, min_p=min_p), np.array(want) / sum(want), atol=1e-3
        )
    np.testing.assert_allclose(quantile_counts(LOGITS, 1000, min_p=0.0), PROBS, atol=2e-3)
    assert quantile_counts(LOGITS, 100, min_p=1.0)[1] == 1.0  # only the most likely


def test_min_p_matches_the_dense_reference_on_random_logits() -> None:
    rng = np.random.default_rng(3)
    for temperature, min_p in ((1.0, 0.05), (0.7, 0.2), (1.8, 0.01)):
        logits = (rng.standard_normal((1, 64)) * 3).astype(np.float32)
        want = reference_min_p(logits[0].astype(np.float64), temperature, min_p)
        got = quantile_counts(logits, 20_000, temperature=temperature, min_p=min_p)
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_sample_rows_are_independent_of_their_batch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32) * 3
    params = [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(temperature=0.8, top_p=0.9, seed=2),
        SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=3),
        SamplingParams(temperature=1.5, top_p=0.5, seed=4),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.95, seed=5),
    ]
    indices = [0, 7, 3, 100, 2]
    together = sample(np, logits, params, indices)
    for row in range(5):
        alone = sample(np, logits[row : row + 1], params[row : row + 1], indices[row : row + 1])
        assert alone[0] == together[row]
    assert together[0] == logits[0].argmax()
    assert (sample(np, logits, params, indices) == together).all()
