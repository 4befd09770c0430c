"""The engine's logits and greedy tokens equal Hugging Face transformers'.

The checkpoints and reference outputs in tests/fixtures/ were written by
transformers itself (scripts/make_fixtures.py; versions in manifest.json).
Prompts of 1, 7, 40 and 70 tokens cover a single token, a short prompt, and
prompts longer than one 16-token KV block and one 32-token prefill chunk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES
from engine_probe import engine_logits

from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams

NAMES = sorted(json.loads((FIXTURES / "manifest.json").read_text())["fixtures"])
CHUNK = 32


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    """fp32 logits within 1e-4 relative to the reference's scale."""
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale


@pytest.fixture(scope="module", params=NAMES)
def case(request: pytest.FixtureRequest):
    model_dir = FIXTURES / request.param
    return model_dir, dict(np.load(model_dir / "expected.npz"))


def test_fixture_set_covers_the_architectures() -> None:
    assert {"llama_gqa", "llama_mqa_tied", "qwen2", "mistral", "llama3_rope"} <= set(NAMES)


def test_prompt_logits_match(case, make_processor) -> None:
    model_dir, expected = case
    processor = make_processor(model_dir)
    for i in range(4):
        prompt = expected[f"prompt_{i}"].tolist()
        got = engine_logits(processor, prompt, prefill_len=len(prompt), chunk=CHUNK)
        assert_logits_close(got, expected[f"logits_{i}"])


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "batch-invariant"])
def test_cached_decode_logits_match(case, make_processor, batch_invariant: bool) -> None:
    """Per-step logits of transformers' greedy generation, through our paged decode path
    (in both engine modes: batch-invariant mode changes products' kernels, not the math)."""
    model_dir, expected = case
    processor = make_processor(model_dir, batch_invariant=batch_invariant)
    for i in range(4):
        prompt, greedy = expected[f"prompt_{i}"].tolist(), expected[f"greedy_{i}"].tolist()
        got = engine_logits(processor, prompt + greedy[:-1], prefill_len=len(prompt), chunk=CHUNK)
        assert_logits_close(got[len(prompt) - 1 :], expected[f"greedy_logits_{i}"])


def test_greedy_tokens_match(case, make_processor) -> None:
    model_dir, expected = case
    processor = make_processor(model_dir, prefill_token_budget=CHUNK)
    requests = [
        Request(
            f"p{i}",
            expected[f"prompt_{i}"].tolist(),
            SamplingParams(max_new_tokens=12, ignore_eos=True),
        )
        for i in range(4)
    ]
    results = run_to_completion(processor, requests)
    for i in range(4):
        assert results[f"p{i}"].token_ids == expected[f"greedy_{i}"].tolist()
