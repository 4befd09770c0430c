"""One pipeline: `python -m worker.batch` and the server give the same answers.

Both run server/frontend.py (validation, detokenizer, stop strings) over the
same engine, in-process or over shared memory; this checks it end to end with
a real batch subprocess and a real server over loopback.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_harness import run_batch as batch_cli
from service_harness import start_server

from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams

pytestmark = pytest.mark.timeout(180)
SEEDS = range(6)


def run_batch(model: Path, tmp_path: Path, lines: list[dict]) -> list[dict]:
    done, records = batch_cli(model, tmp_path, lines)
    assert done.returncode == 0, done.stderr
    return records


def serve(model: Path, tmp_path: Path, lines: list[dict]) -> list[dict]:
    """The same lines through a real server's Generate, as batch output records."""
    server = start_server(model, tmp_path / "server.log", "--max-batch-size", "4")

    def one(line: dict) -> dict:
        chunks = list(server.stub().Generate(pb.GenerateRequest(**line), timeout=60))
        return {
            "request_id": line["request_id"],
            "token_ids": [t for c in chunks for t in c.token_ids],
            "text": "".join(c.text for c in chunks),
            "finish_reason": pb.FinishReason.Name(chunks[-1].finish_reason),
            "usage": {
                "prompt_tokens": chunks[-1].usage.prompt_tokens,
                "completion_tokens": chunks[-1].usage.completion_tokens,
                "cached_prompt_tokens": chunks[-1].usage.cached_prompt_tokens,
            },
        }

    try:
        with ThreadPoolExecutor(len(lines)) as pool:
            return list(pool.map(one, lines))
    finally:
        assert server.stop() == 0


def plain_window(text: str, length: int) -> int:
    """Start of a window of `length` characters near the middle with no U+FFFD in it."""
    for start in range(len(text) // 4, len(text) - length):
        if "\ufffd" not in text[start : start + length]:
            return start
    raise AssertionError(f"no plain window of {length} characters in {text!r}")


def test_batch_and_server_give_the_same_text_with_overlapping_and_multi_token_stops(
    default_model: Path, tmp_path: Path
) -> None:
    # Seeded sampling (deterministic too) gives the random-weight model varied text.
    sampled = {"max_new_tokens": 40, "temperature": 0.7, "ignore_eos": True}
    base = [
        {"request_id": f"r{seed}", "prompt": "Hello there, friend", "seed": seed, **sampled}
        for seed in SEEDS
    ]
    full = run_batch(default_model, tmp_path, base)
    lines = []
    for line, record in zip(base, full, strict=True):
        text = record["text"]
        at = plain_window(text, 5)
        window = text[at : at + 5]
        # Overlapping: the inner stop ends first, so the cut is at its start, not at the
        # outer one's (which starts earlier). Multi-token: 5 characters span several tokens.
        stop = [window[0:4], window[1:3]] if len(lines) % 2 == 0 else [window]
        lines.append({**line, "stop": stop})
    offline, served = (
        run_batch(default_model, tmp_path, lines),
        serve(default_model, tmp_path, lines),
    )
    assert offline == served
    rules_differ = 0
    for line, before, after in zip(lines, full, offline, strict=True):
        stops = line["stop"]
        assert after["finish_reason"] == "FINISH_REASON_STOP", (stops, before["text"])
        found = [(before["text"].find(s) + len(s), before["text"].find(s)) for s in stops]
        cut = min(f for f in found if f[1] >= 0)[1]  # the match that ends first
        assert after["text"] == before["text"][:cut]
        assert len(after["token_ids"]) < len(before["token_ids"])
        rules_differ += cut != min(start for _, start in found if start >= 0)
    assert rules_differ > 0  # "ends first" was really told apart from "starts first"


def test_min_p_works_over_grpc_and_offline(
    default_model: Path, tmp_path: Path, make_processor
) -> None:
    sampled = {"max_new_tokens": 24, "temperature": 1.5, "seed": 11, "ignore_eos": True}
    lines = [
        {"request_id": "min_p", "prompt_token_ids": [5, 6, 7], "min_p": 0.3, **sampled},
        {"request_id": "off", "prompt_token_ids": [5, 6, 7], **sampled},
    ]
    offline, served = (
        run_batch(default_model, tmp_path, lines),
        serve(default_model, tmp_path, lines),
    )
    assert offline == served
    params = SamplingParams(max_new_tokens=24, temperature=1.5, seed=11, ignore_eos=True, min_p=0.3)
    engine = run_to_completion(make_processor(), [Request("m", [5, 6, 7], params)])["m"]
    assert offline[0]["token_ids"] == engine.token_ids  # min_p reached the sampler
    assert offline[0]["token_ids"] != offline[1]["token_ids"]  # and changed the draws
