"""Speculative decoding through the entry points: flags and env, `python -m worker.batch`
(stop strings), a served model's GetStats and metrics, the client's stats table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from service_harness import ServerGroup, free_port, run_batch, wait_for
from test_metrics_endpoint import Scrape

from client.commands import stats_table
from client.types import stats_from_pb
from server.config import ServerConfig
from server.metrics import Metrics
from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.messages import Status
from worker.channel.types import EngineConfig, SamplingParams, WorkerArgs

pytestmark = pytest.mark.timeout(240)

COPY = np.random.default_rng(5).integers(3, 512, size=12).tolist() * 3


def test_flags_and_env_reach_the_engine_config(tmp_path: Path) -> None:
    env = {"NUM_SPECULATIVE_TOKENS": "3", "PROMPT_LOOKUP_MAX": "5"}
    config = ServerConfig.from_args(["--model", "m", "--prompt-lookup-min", "1"], env)
    engine = config.engine
    assert (engine.num_speculative_tokens, engine.prompt_lookup_max) == (3, 5)
    assert engine.prompt_lookup_min == 1 and engine.speculation == "ngram"
    flags = ["--model", "m", "--draft-model", str(tmp_path), "--num-speculative-tokens", "2"]
    assert ServerConfig.from_args(flags, {}).engine.speculation == "draft"
    assert ServerConfig.from_args(["--model", "m"], {}).engine.speculation == ""


def test_worker_args_carry_the_speculation_settings(tmp_path: Path) -> None:
    engine = EngineConfig(num_speculative_tokens=3, draft_model=str(tmp_path), prompt_lookup_min=1)
    args = WorkerArgs(0, "m", engine, "in", "out", 3, 4)
    assert WorkerArgs.from_json(args.to_json()) == args


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--num-speculative-tokens", "17"],
            "num_speculative_tokens (--num-speculative-tokens / $NUM_SPECULATIVE_TOKENS) "
            "must be in [0, 16] (got 17)",
        ),
        (
            ["--speculative-method", "draft"],
            "draft_model (--draft-model / $DRAFT_MODEL) must be set with speculative_method draft",
        ),
        (
            ["--draft-model", "/nonexistent/draft", "--num-speculative-tokens", "2"],
            "draft_model (--draft-model / $DRAFT_MODEL) must name an existing checkpoint",
        ),
    ],
)
def test_bad_speculation_flags_name_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig.from_args(["--model", "m", *flags], {})


def test_offline_batch_with_speculation_writes_the_plain_results(
    default_model: Path, tmp_path: Path, make_processor
) -> None:
    # Greedy, so the text is known: cut it with a stop string from its middle.
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = run_to_completion(make_processor(), [Request("c", COPY, params)])["c"].token_ids
    text = make_processor().tokenizer.decode(plain)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    lines = [
        {"request_id": "copy", "prompt_token_ids": COPY, "max_new_tokens": 40, "ignore_eos": True},
        {"request_id": "stop", "prompt_token_ids": COPY, "max_new_tokens": 40, "stop": [stop]},
        {"request_id": "sampled", "prompt_token_ids": COPY[:20], "max_new_tokens": 30,
         "temperature": 0.8, "seed": 4},
    ]  # fmt: skip
    (tmp_path / "plain").mkdir()
    (tmp_path / "spec").mkdir()
    proc, want = run_batch(default_model, tmp_path / "plain", lines)
    assert proc.returncode == 0, proc.stderr
    flags = ("--num-speculative-tokens", "4", "--prompt-lookup-min", "2")
    proc, got = run_batch(default_model, tmp_path / "spec", lines, *flags)
    assert proc.returncode == 0, proc.stderr
    assert got == want
    assert want[0]["token_ids"] == plain
    assert want[1]["finish_reason"] == "FINISH_REASON_STOP" and stop not in want[1]["text"]
    assert text.startswith(want[1]["text"]) and len(want[1]["text"]) < len(text)
    assert re.search(r"speculative decoding: \d+ of \d+ draft tokens accepted", proc.stderr)


def test_served_speculation_reports_acceptance_in_stats_and_metrics(
    servers: ServerGroup, make_processor
) -> None:
    port = free_port()
    server = servers.start("--num-speculative-tokens", "4", "--metrics-port", str(port))
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    plain: BatchProcessor = make_processor()
    want = run_to_completion(plain, [Request("c", COPY, params)])["c"].token_ids
    stub = server.stub()
    request = pb.GenerateRequest(prompt_token_ids=COPY, max_new_tokens=32, ignore_eos=True)
    got = [t for chunk in stub.Generate(request, timeout=60) for t in chunk.token_ids]
    assert got == want

    def drafted() -> pb.Stats | None:
        stats = stub.GetStats(pb.GetStatsRequest())
        return stats if stats.total.draft_tokens else None

    stats = wait_for(drafted, 10, "a Status with draft tokens")
    total, row = stats.total, stats.workers[0]
    assert 0 < total.accepted_draft_tokens <= total.draft_tokens == row.draft_tokens
    assert total.draft_acceptance_rate == pytest.approx(
        total.accepted_draft_tokens / total.draft_tokens
    )
    assert row.draft_acceptance_rate == total.draft_acceptance_rate
    scrape = Scrape(port)
    assert scrape.sum("shoal_speculative_draft_tokens_total") == total.draft_tokens
    assert scrape.sum("shoal_speculative_accepted_tokens_total") == total.accepted_draft_tokens
    assert "drafts accepted" in stats_table(stats_from_pb(stats))
    # The worker logs each finished request's acceptance.
    wait_for(lambda: "draft tokens accepted" in server.log.read_text(), 10, "the request's line")


def status(draft: int, accepted: int) -> Status:
    return Status(
        1, 0, 4, 1, 64, 1000, 10, 0, 1, 5, draft_tokens=draft, accepted_draft_tokens=accepted
    )


def test_draft_counters_stay_monotonic_across_a_worker_restart() -> None:
    metrics = Metrics()
    metrics.worker_ready(0, kv_blocks_total=64)
    metrics.worker_status(0, status(10, 7))
    metrics.worker_status(0, status(16, 9))
    metrics.worker_gone(0)
    metrics.worker_ready(0, kv_blocks_total=64)
    metrics.worker_status(0, status(4, 4))  # a new process counts from 0
    get = metrics.registry.get_sample_value
    assert get("shoal_speculative_draft_tokens_total", {"worker": "0"}) == 20
    assert get("shoal_speculative_accepted_tokens_total", {"worker": "0"}) == 13
