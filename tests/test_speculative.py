"""Speculative decoding's pure parts: prompt lookup, the acceptance rules, draws, the policy.

The distribution checks run the acceptance function over many seeds on a
six-token vocabulary and compare the emitted tokens with the target
distribution by Pearson's chi-square; a deliberately wrong variant (resample
from p instead of the residual) must fail the same check, so the test can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import worker.speculative as speculative
from worker.channel.types import SamplingParams
from worker.sampling import draw_uniform, sample
from worker.spec_policy import AcceptancePolicy, StepCosts, choose_draft_lengths
from worker.speculative import (
    distributions,
    prompt_lookup,
    speculative_draws,
    speculative_verify,
    verify_match,
)

# Pearson chi-square, 5 degrees of freedom (six tokens): P(X > 25.74) = 1e-4. The seeds
# are fixed, so the test is deterministic; a correct sampler passes with a wide margin.
CHI2_CRITICAL_DF5 = 25.74
SEEDS = 20000

P0 = np.array([0.45, 0.2, 0.15, 0.1, 0.1, 0.0])  # target at row 0
P1 = np.array([0.05, 0.05, 0.3, 0.3, 0.0, 0.3])  # target at row 1 (after draft 0)
P2 = np.array([0.1, 0.1, 0.1, 0.1, 0.3, 0.3])  # target at row 2 (the bonus row)
Q0 = np.array([0.1, 0.4, 0.0, 0.3, 0.1, 0.1])  # draft model: mass where p has none, too
Q1 = np.array([0.3, 0.0, 0.3, 0.1, 0.2, 0.1])


def chi_square(tokens: list[int], p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(p))
    expected = p * len(tokens)
    assert counts[expected == 0].sum() == 0, f"tokens outside the support: {counts}"
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def inverse_cdf(p: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right")), len(p) - 1)


def run_speculative(q0: np.ndarray, q1: np.ndarray) -> tuple[list[int], list[int]]:
    """First emitted token of every seed, and the second one where draft 0 was accepted."""
    p, q = np.stack([P0, P1, P2]), np.stack([q0, q1])
    first, second = [], []
    for seed in range(SEEDS):
        # The draft model samples with the plain sampler's draw (draw 0) of each token.
        draft = [inverse_cdf(q0, draw_uniform(seed, 0)), inverse_cdf(q1, draw_uniform(seed, 1))]
        draws = [speculative_draws(seed, i) for i in range(2)]
        bonus = inverse_cdf(P2, draw_uniform(seed, 2))
        out = speculative_verify(p, q, draft, [d[1] for d in draws], [d[0] for d in draws], bonus)
        first.append(out[0])
        if len(out) > 1:
            assert out[0] == draft[0]
            second.append(out[1])
    return first, second


def test_speculative_sampling_emits_the_target_distribution() -> None:
    first, second = run_speculative(Q0, Q1)
    assert chi_square(first, P0) < CHI2_CRITICAL_DF5
    # Given that draft 0 was accepted, the next token follows the target's row 1.
    assert len(second) > SEEDS // 4
    assert chi_square(second, P1) < CHI2_CRITICAL_DF5
    # The acceptance rate is sum(min(p, q)) (Leviathan et al. 2023, section 3.5).
    assert abs(len(second) / SEEDS - np.minimum(P0, Q0).sum()) < 0.02


def test_point_mass_drafts_through_the_general_rule_emit_the_target_distribution() -> None:
    point0, point1 = np.eye(6)[1], np.eye(6)[2]
    first, second = run_speculative(point0, point1)
    assert chi_square(first, P0) < CHI2_CRITICAL_DF5
    assert chi_square(second, P1) < CHI2_CRITICAL_DF5


def test_the_check_fails_a_sampler_that_skips_the_residual(monkeypatch) -> None:
    def from_p(p: np.ndarray, q: np.ndarray, uniform: float) -> int:
        return inverse_cdf(p, uniform)

    monkeypatch.setattr(speculative, "sample_residual", from_p)
    first, _ = run_speculative(Q0, Q1)
    assert chi_square(first, P0) > 10 * CHI2_CRITICAL_DF5


def test_plain_sampler_over_the_same_seeds_passes_the_check() -> None:
    logits = np.log(np.maximum(P0, 1e-30)).astype(np.float32)[None, :]
    params = SamplingParams(temperature=1.0)
    picks = []
    for seed in range(0, SEEDS, 4):
        row = sample(np, logits, [SamplingParams(**{**params.__dict__, "seed": seed})], [0])
        picks.append(int(row[0]))
    assert chi_square(picks, P0) < CHI2_CRITICAL_DF5


def test_residual_sample_stays_in_the_residual_support() -> None:
    for u in (0.0, 0.3, 0.999999, np.nextafter(1.0, 0)):
        token = speculative.sample_residual(P0, Q0, float(u))
        assert P0[token] > Q0[token]
    assert speculative.sample_residual(P0, P0, 0.5) == inverse_cdf(P0, 0.5)  # no residual


def test_match_rule_accepts_the_agreeing_prefix_then_the_targets_token() -> None:
    assert verify_match([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert verify_match([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # reject at 1: the target's token
    assert verify_match([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert verify_match([], [3]) == [3]


def test_speculative_draws_are_the_samplers_stream_past_its_draw() -> None:
    seed, index = 2**63 + 7, 41
    words = np.random.Generator(np.random.Philox(key=seed, counter=index)).random(3)
    assert words[0] == draw_uniform(seed, index)
    assert speculative_draws(seed, index) == (words[1], words[2])
    # No other token's draws 0-2 repeat them.
    others = {
        w
        for i in (index - 1, index + 1)
        for w in np.random.Generator(np.random.Philox(key=seed, counter=i)).random(3)
    }
    assert not others & set(words)


@pytest.mark.parametrize(
    ("tokens", "k", "min_n", "max_n", "want"),
    [
        # "1 2 3" occurs earlier, followed by 9 8 7: the draft copies what came next.
        ([1, 2, 3, 9, 8, 7, 5, 1, 2, 3], 3, 2, 4, [9, 8, 7]),
        # The longest n wins over a more recent shorter match (2 3 -> 4 at the end).
        ([1, 2, 3, 9, 9, 2, 3, 4, 1, 2, 3], 2, 2, 4, [9, 9]),
        # Of equal n, the most recent match wins.
        ([2, 3, 5, 2, 3, 6, 2, 3], 1, 2, 2, [6]),
        # A loop of period 2 drafts its continuation past the end (an overlapping copy).
        ([7, 4, 5, 4, 5, 4, 5], 5, 2, 3, [4, 5, 4, 5, 4]),
        # No match of at least min_n tokens: no draft.
        ([1, 2, 3, 4, 5, 3], 3, 2, 3, []),
        # min_n = 1 takes a single-token match.
        ([1, 2, 3, 4, 5, 3], 2, 1, 3, [4, 5]),
        ([1], 3, 1, 3, []),
    ],
)
def test_prompt_lookup(tokens: list[int], k: int, min_n: int, max_n: int, want: list[int]) -> None:
    assert prompt_lookup(np.array(tokens), k, min_n, max_n) == want


def test_distributions_are_the_samplers_filters_in_token_order() -> None:
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    params = [SamplingParams(temperature=0.5, top_k=2), SamplingParams(temperature=1.0)]
    order, ranked, dense = distributions(np, logits, params)
    np.testing.assert_allclose(dense.sum(axis=-1), 1, rtol=1e-6)
    assert np.count_nonzero(dense[0]) == 2 and dense[0, 1] / dense[0, 2] == pytest.approx(np.e**2)
    np.testing.assert_allclose(np.take_along_axis(dense, order, axis=-1), ranked)
    np.testing.assert_allclose(dense[1], np.exp(logits[1]) / np.exp(logits[1]).sum(), rtol=1e-6)


def run_policy(policy: AcceptancePolicy, outcome: Callable[[int], int], steps: int) -> list[int]:
    lengths = []
    for _ in range(steps):
        k = policy.draft_length(8)
        lengths.append(k)
        if k:
            policy.update(k, outcome(k))
    return lengths


def test_policy_drafts_further_while_drafts_are_accepted() -> None:
    lengths = run_policy(AcceptancePolicy(), lambda k: k, 8)
    assert lengths[0] == 1 and lengths[-1] == 8 and lengths == sorted(lengths)


def test_policy_backs_off_while_drafts_fail_and_recovers() -> None:
    policy = AcceptancePolicy()
    lengths = run_policy(policy, lambda k: 0, 300)
    # Failing probes come ever more rarely: after the first misses, at most one draft
    # every MAX_COOLDOWN steps.
    assert sum(k > 0 for k in lengths) <= 12 and sum(k > 0 for k in lengths[-128:]) <= 2
    assert policy.cooldown <= AcceptancePolicy.MAX_COOLDOWN
    lengths = run_policy(policy, lambda k: k, 200)  # the text turns repetitive
    assert lengths[-1] == 8


def test_step_costs_interpolate_and_stay_optimistic_past_what_was_measured() -> None:
    costs = StepCosts()
    assert costs.estimate(2, 2) is None  # nothing at 2 decodes yet
    costs.observe(2, 2, 0.030)
    costs.observe(2, 10, 0.070)
    assert costs.estimate(2, 2) == 0.030 and costs.estimate(2, 6) == pytest.approx(0.050)
    assert costs.estimate(2, 40) == 0.070  # larger steps: assumed no dearer until measured
    costs.observe(2, 10, 0.110)  # a running average
    assert costs.estimate(2, 10) == pytest.approx(0.080)
    assert costs.estimate(3, 3) is None
    for _ in range(StepCosts.MAX_AGE):  # plain steps only, for a long while
        costs.observe(2, 2, 0.030)
    assert costs.estimate(2, 10) == 0.030  # the old 10-row figure is forgotten: retried


def cost_table(table: dict[int, float]) -> Callable[[int], float | None]:
    costs = StepCosts()
    for rows, seconds in table.items():
        costs.observe(1, rows, seconds)
    return lambda rows: costs.estimate(1, rows)


def test_choice_drafts_when_rows_are_nearly_free() -> None:
    gpu_like = cost_table({1: 0.010, 5: 0.0105})  # a few more rows: the same weight reads
    # Even a 30 % chance pays for a row; the fourth token's 0.8 % does not.
    assert choose_draft_lengths({"a": [0.3, 0.09, 0.027, 0.008]}, 1, gpu_like) == {"a": 3}


def test_choice_weighs_chances_against_what_extra_rows_cost() -> None:
    # A CPU's BLAS: two rows cost 2.4 x one (matrix-vector -> matrix product), then little more.
    cpu_like = cost_table({1: 0.0277, 2: 0.0675, 5: 0.070})
    assert choose_draft_lengths({"a": [0.5, 0.25, 0.125, 0.06]}, 1, cpu_like) == {}
    sure = [0.95, 0.9, 0.86, 0.81]
    assert choose_draft_lengths({"a": sure}, 1, cpu_like) == {"a": 4}
    # At batch 2 the best chances go first, across sequences.
    costs = StepCosts()
    for rows, seconds in {2: 0.05, 4: 0.05, 6: 0.09}.items():
        costs.observe(2, rows, seconds)
    offers = {"a": [0.9, 0.81, 0.73], "b": [0.2, 0.04]}
    assert choose_draft_lengths(offers, 2, lambda r: costs.estimate(2, r)) == {"a": 2}


def test_choice_measures_the_plain_step_first_then_tries_larger_ones() -> None:
    assert choose_draft_lengths({"a": [0.9]}, 1, lambda rows: None) == {}
    only_plain = cost_table({1: 0.03})
    assert choose_draft_lengths({"a": [0.2, 0.04], "b": [0.1]}, 1, only_plain) == {"a": 2, "b": 1}
