"""Penalties (worker/penalties.py) and min-p against transformers' logits processors, and the
OpenAI penalties against a dense NumPy reference written from OpenAI's formula.

tests/fixtures/smollm2_sampling/processors.npz holds fixed random logits, input ids and what
transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper + MinPLogitsWarper
and log_softmax make of them (scripts/make_fixtures.py --smollm2-sampling).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.channel.types import SamplingParams
from worker.penalties import apply_penalties, penalize, token_counts
from worker.sampling import filtered_probs, log_softmax

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2_sampling"
PROCESSORS = json.loads((FIXTURES / "expected.json").read_text())["processors"]


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "processors.npz") as data:
        return dict(data)


def reference_penalties(
    logits: np.ndarray,
    prompt: list[int],
    output: list[int],
    repetition: float,
    frequency: float,
    presence: float,
) -> np.ndarray:
    """One row, from the definitions: Hugging Face's repetition penalty once per token id seen
    in prompt + output, then OpenAI's `mu[j] - c[j] * alpha_frequency - (c[j] > 0) *
    alpha_presence` with c[j] counted over the output only."""
    out = logits.astype(np.float64)
    for token in set(prompt) | set(output):
        value = out[token]
        out[token] = value * repetition if value < 0 else value / repetition
    for token in set(output):
        count = output.count(token)
        out[token] -= count * frequency + presence
    return out


def test_repetition_penalty_equals_transformers(npz: dict[str, np.ndarray]) -> None:
    logits, history = npz["logits"], npz["input_ids"]
    rows, vocab = logits.shape
    counts = token_counts(np, history.tolist(), vocab)  # HF: every input id, prompt or not
    none = np.zeros_like(counts)
    for p in PROCESSORS["repetition_penalties"]:
        want = npz[f"repetition_{p}"]
        got = apply_penalties(
            np,
            logits,
            counts,
            none,
            np.full(rows, p, dtype=np.float32),
            np.zeros(rows, dtype=np.float32),
            np.zeros(rows, dtype=np.float32),
        )
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert not np.array_equal(got, logits)  # the penalty did something
    # A zero logit stays 0; a seen positive one shrinks and a seen negative one grows (p > 1).
    high = npz[f"repetition_{max(PROCESSORS['repetition_penalties'])}"]
    assert high[0, 2] == 0.0 and high[0, 0] < logits[0, 0] and high[0, 1] < logits[0, 1]


def test_repetition_penalty_counts_the_prompt_and_the_completion_alike(
    npz: dict[str, np.ndarray],
) -> None:
    """Split each fixture history anywhere into prompt and output: the same as transformers."""
    logits, history = npz["logits"], npz["input_ids"].tolist()
    p = PROCESSORS["repetition_penalties"][0]
    params = [SamplingParams(repetition_penalty=p)] * len(history)
    for split in (0, 5, len(history[0])):
        got = penalize(
            np, logits, params, [h[:split] for h in history], [h[split:] for h in history]
        )
        np.testing.assert_allclose(got, npz[f"repetition_{p}"], rtol=1e-6, atol=1e-6)


def test_min_p_after_temperature_equals_transformers(npz: dict[str, np.ndarray]) -> None:
    """MinPLogitsWarper's kept tokens and their renormalised probabilities, from
    filtered_probs at the same temperature."""
    logits = npz["logits"]
    rows = logits.shape[0]
    t = PROCESSORS["temperature"]
    for m in PROCESSORS["min_p"]:
        want = npz[f"min_p_{m}"]  # -inf where dropped
        order, probs = filtered_probs(
            np,
            logits,
            np.full(rows, t, dtype=np.float32),
            np.zeros(rows, dtype=np.int64),
            np.ones(rows, dtype=np.float32),
            np.full(rows, m, dtype=np.float32),
        )
        got = np.zeros_like(probs)
        np.put_along_axis(got, order, probs, axis=-1)  # back to token order
        got /= got.sum(axis=-1, keepdims=True)
        kept = np.isfinite(want)
        np.testing.assert_array_equal(got > 0, kept)
        assert kept.sum(axis=-1).max() > 1 and kept.sum(axis=-1).max() < logits.shape[1]
        expected = np.where(kept, np.exp(want - want.max(axis=-1, keepdims=True)), 0.0)
        expected /= expected.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_log_softmax_with_temperature_equals_transformers(npz: dict[str, np.ndarray]) -> None:
    logits = npz["logits"]
    t = np.full(logits.shape[0], PROCESSORS["temperature"], dtype=np.float32)
    got = log_softmax(np, logits, t)
    np.testing.assert_allclose(got, npz["log_softmax_temperature"], rtol=0, atol=2e-6)


def test_openai_and_repetition_penalties_equal_the_dense_reference() -> None:
    rng = np.random.default_rng(5)
    vocab = 64
    logits = (rng.standard_normal((5, vocab)) * 3).astype(np.float32)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in (9, 0, 30, 4, 12)]
    outputs = [rng.integers(0, vocab // 2, size=n).tolist() for n in (20, 7, 0, 40, 3)]
    params = [
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0),
        SamplingParams(repetition_penalty=1.7, presence_penalty=1.0),  # no output yet
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-2.0, presence_penalty=2.0),
        SamplingParams(repetition_penalty=100.0),
    ]
    got = penalize(np, logits, params, prompts, outputs)
    for r, p in enumerate(params):
        want = reference_penalties(
            logits[r],
            prompts[r],
            outputs[r],
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        )
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-5)
        assert not np.allclose(got[r], logits[r])


def test_only_penalised_rows_change_and_an_unpenalised_step_costs_nothing() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 32)).astype(np.float32)
    before = logits.copy()
    plain = [SamplingParams(), SamplingParams(temperature=0.7, top_k=3)]
    # Nothing penalised: the very same array back, no counts built.
    unchanged = logits[:2]
    assert penalize(np, unchanged, plain, [[1, 2]] * 2, [[3, 3]] * 2) is unchanged
    mixed = [plain[0], SamplingParams(frequency_penalty=1.0), plain[1]]
    got = penalize(np, logits, mixed, [[1], [1], [1]], [[3, 3], [3, 3], [3, 3]])
    np.testing.assert_array_equal(logits, before)  # the model's logits are left as they were
    np.testing.assert_array_equal(got[[0, 2]], before[[0, 2]])
    assert got[1, 3] == pytest.approx(before[1, 3] - 2.0)
    np.testing.assert_array_equal(np.delete(got[1], 3), np.delete(before[1], 3))


def test_token_counts_is_one_bincount_over_rows() -> None:
    counts = token_counts(np, [[1, 1, 4], [], [0, 4, 4, 4]], vocab=5)
    np.testing.assert_array_equal(counts, [[0, 2, 0, 0, 1], [0] * 5, [1, 0, 0, 0, 3]])
