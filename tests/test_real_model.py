"""What a user sees with the real default model, checked against transformers.

SmolLM2-135M-Instruct (the Q4_1 GGUF `make model` fetches), loaded by shoal
straight from the GGUF, against tests/fixtures/smollm2/: what transformers
computed on the same file (its GGUF integration dequantizes the weights to
float32), written by scripts/make_fixtures.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_probe import engine_logits
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)
from service_harness import REPO, start_server

from server.prompts import PromptEncoder
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, FinishReason, SamplingParams
from worker.checkpoint import load_checkpoint
from worker.engine_core import EngineCore

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def processor(smollm2_gguf: Path) -> BatchProcessor:
    backend = select_backend("cpu")
    config = EngineConfig(max_batch_size=4, kv_cache_mb=64, device="cpu")
    return BatchProcessor(load_checkpoint(smollm2_gguf, backend), config, backend)


@pytest.fixture(scope="module")
def prompts(processor: BatchProcessor) -> PromptEncoder:
    """The front's encoder, built from the worker's Ready as the server builds it."""
    return PromptEncoder.from_ready(EngineCore(processor).ready())


def test_logits_and_greedy_tokens_equal_transformers(processor: BatchProcessor) -> None:
    logits = np.load(FIXTURES / "expected.npz")
    for i, case in enumerate(EXPECTED["prompts"]):
        ids = case["ids"]
        assert processor.tokenizer.encode(case["text"]).ids == ids
        got = engine_logits(processor, ids, prefill_len=len(ids), chunk=16)[-1]
        want = logits[f"logits_{i}"]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), case["text"]
        params = SamplingParams(max_new_tokens=len(case["greedy_ids"]), ignore_eos=True)
        done = run_to_completion(processor, [Request("g", ids, params)])["g"]
        assert done.token_ids == case["greedy_ids"], case["text"]


def test_chat_renderings_and_answers_equal_transformers(
    processor: BatchProcessor, prompts: PromptEncoder
) -> None:
    assert prompts.chat_template is not None
    for chat in EXPECTED["chats"]:
        assert prompts.chat_template.render(chat["messages"]) == chat["rendered"], chat["name"]
        ids = prompts.encode_chat(chat["messages"])
        assert ids == chat["ids"], chat["name"]
        params = SamplingParams(max_new_tokens=48)
        done = run_to_completion(processor, [Request("c", ids, params)])["c"]
        assert done.token_ids == chat["completion_ids"], chat["name"]
        assert done.finish_reason == FinishReason.EOS  # <|im_end|>, the end of the turn


def test_served_chat_answers_and_stops_at_the_end_of_its_turn(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    server = start_server(smollm2_gguf, tmp_path / "server.log", "--kv-cache-mb", "128")
    try:
        chat = subprocess.run(
            [sys.executable, "-m", "client", "--target", server.target, "chat"],
            input="What is the capital of France?\n",
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        assert server.stop() == 0
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout and "finish=EOS" in chat.stderr, (chat.stdout, chat.stderr)
