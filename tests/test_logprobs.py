"""Log-probabilities and penalties in the sampler and the engine (random-weight model).

The sampler's numbers are checked against dense NumPy written from the definitions
(log_softmax of logits / T, float64); the engine's against the dense forward pass of
tests/dense_reference.py. transformers' own numbers on the real model are in
tests/test_real_logprobs.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from dense_reference import dense_forward
from test_penalties import reference_penalties

from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams, TokenLogprob
from worker.sampling import MAX_TEMPERATURE, sample, token_logprobs


def reference_log_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, size=n).tolist()


def check(lp: TokenLogprob, row: np.ndarray, token: int, temperature: float, k: int) -> None:
    want = reference_log_softmax(row, temperature)
    assert lp.token_id == token
    assert lp.logprob == pytest.approx(want[token], abs=2e-5)
    assert len(lp.top) == k
    ids = [t for t, _ in lp.top]
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True) and len(set(ids)) == k
    np.testing.assert_allclose(values, np.sort(want)[::-1][:k], atol=2e-5)
    np.testing.assert_allclose(values, want[ids], atol=2e-5)


# -- the sampler -----------------------------------------------------------------------------
def test_logprobs_only_for_the_rows_that_ask_and_as_defined() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    params = [
        SamplingParams(logprobs=True, top_logprobs=20),  # greedy: the raw log-softmax
        SamplingParams(temperature=0.8, seed=1),  # not asking
        SamplingParams(temperature=0.5, top_k=3, seed=2, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=1.7, top_p=0.5, min_p=0.1, seed=3, logprobs=True),
        SamplingParams(),  # not asking
        SamplingParams(temperature=1e31, seed=4, logprobs=True, top_logprobs=1),  # clipped: flat
    ]
    tokens = sample(np, logits, params, [0, 1, 2, 3, 4, 5])
    got = token_logprobs(np, logits, params, tokens)
    assert got[1] is None and got[4] is None
    for r in (0, 2, 3, 5):
        lp = got[r]
        assert lp is not None
        temperature = min(params[r].temperature, MAX_TEMPERATURE)
        check(lp, logits[r], int(tokens[r]), temperature, params[r].top_logprobs)
    # Greedy: the chosen token is the most likely, its logprob the max of the log-softmax.
    assert got[0].top[0] == (got[0].token_id, got[0].logprob)
    assert got[0].logprob == pytest.approx(reference_log_softmax(logits[0], 0).max(), abs=1e-6)
    # Before the cut: a top-k of 3 still reports 5 alternatives with finite values.
    assert all(np.isfinite(v) for _, v in got[2].top)
    assert got[5].logprob == pytest.approx(-np.log(300), abs=1e-4)  # a flat distribution


def test_no_row_asking_costs_nothing() -> None:
    logits = np.zeros((3, 10), dtype=np.float32)
    params = [SamplingParams(), SamplingParams(temperature=1.0)] * 2
    assert token_logprobs(np, logits, params[:3], np.zeros(3, dtype=np.int64)) == [None] * 3


def test_tied_alternatives_are_listed_by_id() -> None:
    logits = np.zeros((1, 50), dtype=np.float32)
    params = [SamplingParams(logprobs=True, top_logprobs=4)]
    (lp,) = token_logprobs(np, logits, params, np.zeros(1, dtype=np.int64))
    assert [t for t, _ in lp.top] == [0, 1, 2, 3]


# -- the engine ------------------------------------------------------------------------------
def requests(logprobs: bool) -> list[Request]:
    """Greedy and seeded rows; with `logprobs`, every second one asks (a mixed batch)."""
    specs = [
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=15, temperature=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_new_tokens=9, temperature=1.3, top_k=40, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=1.0, min_p=0.05, seed=9, ignore_eos=True),
        SamplingParams(max_new_tokens=11, ignore_eos=True, frequency_penalty=1.0),
    ]
    out = []
    for i, params in enumerate(specs):
        if logprobs and i % 2 == 0:
            params = dataclasses.replace(params, logprobs=True, top_logprobs=(0, 20, 3)[i // 2])
        out.append(Request(f"r{i}", prompt(5 + 13 * i, seed=i), params))
    return out


def test_asking_for_logprobs_changes_no_token(make_processor) -> None:
    plain = run_to_completion(make_processor(), requests(logprobs=False))
    asked = run_to_completion(make_processor(), requests(logprobs=True))
    assert {k: v.token_ids for k, v in plain.items()} == {k: v.token_ids for k, v in asked.items()}
    for i, request in enumerate(requests(logprobs=True)):
        done = asked[request.request_id]
        if i % 2:
            assert done.logprobs == [] and plain[request.request_id].logprobs == []
            continue
        assert [lp.token_id for lp in done.logprobs] == done.token_ids
        assert all(len(lp.top) == request.params.top_logprobs for lp in done.logprobs)


def test_engine_logprobs_equal_the_dense_forward(make_processor) -> None:
    """Greedy, seeded sampling and penalties, each token's logprob against the dense model's
    logits: penalised (OpenAI / Hugging Face formulas), divided by T, log-softmaxed."""
    processor = make_processor()
    cases = [
        SamplingParams(max_new_tokens=8, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0.6, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(
            max_new_tokens=8,
            ignore_eos=True,
            repetition_penalty=1.5,
            frequency_penalty=0.4,
            presence_penalty=0.3,
        ),
    ]
    reqs = [
        Request(
            f"c{i}", prompt(9, seed=30 + i), dataclasses.replace(p, logprobs=True, top_logprobs=20)
        )
        for i, p in enumerate(cases)
    ]
    done = run_to_completion(processor, reqs)
    weights = processor.runner.model.weights
    for request in reqs:
        result, p = done[request.request_id], request.params
        tokens = list(request.prompt_ids)
        for lp in result.logprobs:
            row = dense_forward(processor.model_config, weights, tokens)[-1]
            generated = tokens[len(request.prompt_ids) :]
            row = reference_penalties(
                row,
                request.prompt_ids,
                generated,
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            )
            check(lp, row, lp.token_id, p.temperature, 20)
            if p.temperature == 0:  # greedy: the top token, the max of the log-softmax
                assert lp.token_id == int(row.argmax()) == lp.top[0][0]
            else:
                assert lp.token_id in [t for t, _ in lp.top] or lp.logprob < lp.top[-1][1]
            tokens.append(lp.token_id)
        assert tokens[len(request.prompt_ids) :] == result.token_ids


def test_penalties_change_greedy_tokens_as_the_dense_reference(make_processor) -> None:
    processor = make_processor()
    ids = prompt(6, seed=3)
    params = SamplingParams(
        max_new_tokens=12, ignore_eos=True, repetition_penalty=2.0, presence_penalty=1.5
    )
    got = run_to_completion(processor, [Request("p", ids, params)])["p"].token_ids
    plain = run_to_completion(processor, [Request("q", ids, SamplingParams(12, ignore_eos=True))])
    assert got != plain["q"].token_ids  # the penalties mattered
    tokens = list(ids)
    weights = processor.runner.model.weights
    for _ in range(12):
        row = dense_forward(processor.model_config, weights, tokens)[-1]
        row = reference_penalties(row, ids, tokens[len(ids) :], 2.0, 0.0, 1.5)
        tokens.append(int(row.argmax()))
    assert got == tokens[len(ids) :]


def test_resumed_request_keeps_its_penalties_and_logprobs(make_processor) -> None:
    """A request resumed from its tokens (a worker died) counts them in its penalties, and
    its new tokens get the logprobs an uninterrupted run gives them."""
    ids = prompt(17, seed=2)
    params = SamplingParams(
        max_new_tokens=14,
        temperature=0.8,
        seed=21,
        ignore_eos=True,
        frequency_penalty=1.2,
        repetition_penalty=1.3,
        logprobs=True,
        top_logprobs=4,
    )
    # Batch-invariant: the resumed request prefills what the first run decoded, to the bit.
    full = run_to_completion(make_processor(batch_invariant=True), [Request("a", ids, params)])
    processor = make_processor(batch_invariant=True)
    processor.add_request(0, ids, params, generated=full["a"].token_ids[:6])
    rest = []
    while processor.has_work():
        rest += processor.process_step()
    assert [r.token_id for r in rest] == full["a"].token_ids[6:]
    assert [r.logprob for r in rest] == full["a"].logprobs[6:]
