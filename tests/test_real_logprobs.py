"""Log-probabilities and the repetition penalty on the real default model, against transformers.

SmolLM2-135M-Instruct (the GGUF `make model` fetches), loaded by shoal, against
tests/fixtures/smollm2_sampling/expected.json: transformers' greedy paths on the same file
and the log_softmax of each step's logits (raw, divided by the temperature, after
RepetitionPenaltyLogitsProcessor, and after both), written by scripts/make_fixtures.py
--smollm2-sampling. A temperature with top_k = 1 follows the greedy path while its
logprobs are those of the tempered distribution (shoal reports them before the cut).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)

from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams, TokenLogprob
from worker.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2_sampling"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
T, P = EXPECTED["temperature"], EXPECTED["repetition_penalty"]
TOLERANCE = 1e-4  # natural-log units; transformers dequantizes the same GGUF to float32
pytestmark = pytest.mark.timeout(300)

# fixture key -> (the path it follows, shoal's sampling parameters)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "raw": ("greedy_ids", {}),
    "temperature": ("greedy_ids", {"temperature": T, "top_k": 1}),
    "repetition": ("penalised_ids", {"repetition_penalty": P}),
    "repetition_temperature": (
        "penalised_ids",
        {"repetition_penalty": P, "temperature": T, "top_k": 1},
    ),
}


@pytest.fixture(scope="module")
def results(smollm2_gguf: Path) -> dict[str, Any]:
    """Every case of every path in one batch, as the engine serves them."""
    backend = select_backend("cpu")
    config = EngineConfig(max_batch_size=8, kv_cache_mb=64, device="cpu")
    processor = BatchProcessor(load_checkpoint(smollm2_gguf, backend), config, backend)
    requests = []
    for i, path in enumerate(EXPECTED["paths"]):
        steps = len(path["greedy_ids"])
        for key, (_, extra) in CASES.items():
            params = SamplingParams(
                max_new_tokens=steps,
                ignore_eos=True,
                logprobs=True,
                top_logprobs=20,
                seed=i,
                **extra,
            )
            requests.append(Request(f"{i}-{key}", path["ids"], params))
    return run_to_completion(processor, requests)


def check_steps(got: list[TokenLogprob], want: list[dict[str, Any]], name: str) -> None:
    assert len(got) == len(want), name
    for j, (lp, step) in enumerate(zip(got, want, strict=True)):
        where = f"{name} step {j}"
        assert lp.token_id == step["token"], where
        assert abs(lp.logprob - step["logprob"]) <= TOLERANCE, (where, lp.logprob, step["logprob"])
        ids = [t for t, _ in lp.top]
        reference = dict(zip(step["top_ids"], step["top_logprobs"], strict=True))
        assert set(ids) == set(reference), where  # the same 20 alternatives ...
        for token, value in lp.top:  # ... with the same values
            assert abs(value - reference[token]) <= TOLERANCE, (where, token)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True), where
        assert ids[0] == step["top_ids"][0] == lp.token_id, where  # greedy: the most likely


@pytest.mark.parametrize("key", list(CASES))
def test_logprobs_equal_transformers(results: dict[str, Any], key: str) -> None:
    ids_key, _ = CASES[key]
    for i, path in enumerate(EXPECTED["paths"]):
        done = results[f"{i}-{key}"]
        assert done.token_ids == path[ids_key], (key, path["text"])
        check_steps(done.logprobs, path[key], f"{key} {path['text']!r}")


def test_the_repetition_penalty_changes_the_path_as_transformers_does(
    results: dict[str, Any],
) -> None:
    repeating = EXPECTED["paths"][1]  # "The cat sat on the mat. ..." repeats itself greedily
    assert repeating["greedy_text"].startswith(" mat. The cat sat")
    assert repeating["penalised_ids"] != repeating["greedy_ids"]
    assert results["1-repetition"].token_ids == repeating["penalised_ids"]
    assert results["1-raw"].token_ids == repeating["greedy_ids"]
    # Tempering changes every logprob but not the greedy path (top_k = 1).
    assert results["1-temperature"].logprobs[0].logprob != results["1-raw"].logprobs[0].logprob
