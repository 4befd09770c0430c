"""Prefix caching as a user sees it: `usage.cached_prompt_tokens` over gRPC, OpenAI's
`usage.prompt_tokens_details.cached_tokens` over HTTP, the JSONL output's usage, the hit
rate in GetStats, `shoal stats` and the Prometheus metrics; `--no-prefix-caching`; and the
real default model's answers with and without the cache.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from service_harness import REPO, RunningServer, ServerGroup, free_port, run_batch

from server.prompts import PromptEncoder
from shoal.v1 import inference_pb2 as pb
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import load_checkpoint
from worker.engine_core import EngineCore

pytestmark = pytest.mark.timeout(240)

# 40 tokens: a repeat finds 2 full blocks of 16 cached (the last block is always computed).
PROMPT = np.random.default_rng(5).integers(1, 512, size=40).tolist()
CACHED = 32


@pytest.fixture(scope="module")
def served(module_servers: ServerGroup) -> tuple[RunningServer, int]:
    metrics_port = free_port()
    server = module_servers.start(
        *("--http-port", str(free_port()), "--metrics-port", str(metrics_port)),
        *("--kv-cache-mb", "16"),
    )
    return server, metrics_port


def generate(server: RunningServer, ids: list[int]) -> pb.Usage:
    request = pb.GenerateRequest(prompt_token_ids=ids, max_new_tokens=4, ignore_eos=True)
    chunks = list(server.stub().Generate(request, timeout=60))
    assert all(not c.HasField("usage") for c in chunks[:-1])
    return chunks[-1].usage


def test_cached_prompt_tokens_grpc_http_and_the_hit_rate(
    served: tuple[RunningServer, int],
) -> None:
    server, metrics_port = served
    first = generate(server, PROMPT)
    assert (first.prompt_tokens, first.cached_prompt_tokens) == (40, 0)
    again = generate(server, PROMPT)
    assert (again.prompt_tokens, again.cached_prompt_tokens) == (40, CACHED)

    sdk = OpenAI(base_url=server.http + "/v1", api_key="x", max_retries=0, timeout=60)
    model = sdk.models.list().data[0].id
    reply = sdk.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert reply.usage.prompt_tokens == 40
    assert reply.usage.prompt_tokens_details.cached_tokens == CACHED
    streamed = sdk.completions.create(
        model=model,
        prompt=PROMPT[:39],  # the same 2 blocks, a different last one
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = list(streamed)[-1].usage
    assert usage.prompt_tokens == 39 and usage.prompt_tokens_details.cached_tokens == CACHED

    stats = server.stub().GetStats(pb.GetStatsRequest(), timeout=10)
    queried, hit = 40 + 40 + 40 + 39, 3 * CACHED
    (row,) = stats.workers
    for w in (row, stats.total):
        assert (w.prefix_cache_query_tokens, w.prefix_cache_hit_tokens) == (queried, hit)
        assert w.prefix_cache_hit_rate == pytest.approx(hit / queried)
        assert w.kv_blocks_cached == 2 and w.kv_blocks_used == 0  # 43 tokens had K/V

    table = subprocess.run(
        [sys.executable, "-m", "client", "--target", server.target, "stats"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    ).stdout.splitlines()
    assert "prefix hit" in table[0]
    assert table[1].split()[-1] == f"{hit / queried:.1%}"  # worker 0
    assert table[2].split()[-1] == f"{hit / queried:.1%}"  # total

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}

    def value(name: str, suffix: str = "") -> float:
        (sample,) = [s for s in families[name].samples if s.name == name + suffix]
        assert sample.labels == {"worker": "0"}
        return sample.value

    assert value("shoal_prefix_cache_query_tokens", "_total") == queried
    assert value("shoal_prefix_cache_hit_tokens", "_total") == hit
    assert value("shoal_prefix_cache_hit_rate") == pytest.approx(hit / queried)
    assert value("shoal_kv_blocks_cached") == 2


def test_no_prefix_caching_reports_no_hits(servers: ServerGroup) -> None:
    server = servers.start("--no-prefix-caching", "--kv-cache-mb", "16")
    assert generate(server, PROMPT).cached_prompt_tokens == 0
    assert generate(server, PROMPT).cached_prompt_tokens == 0
    total = server.stub().GetStats(pb.GetStatsRequest(), timeout=10).total
    assert (total.prefix_cache_query_tokens, total.prefix_cache_hit_rate) == (0, 0.0)
    assert total.kv_blocks_cached == 0


@pytest.mark.parametrize(
    ("flags", "cached"), [((), [0, CACHED]), (("--no-prefix-caching",), [0, 0])]
)
def test_jsonl_usage_carries_cached_prompt_tokens(
    default_model: Path, tmp_path: Path, flags: tuple[str, ...], cached: list[int]
) -> None:
    line = {"prompt_token_ids": PROMPT, "max_new_tokens": 3, "ignore_eos": True}
    # One at a time, so the second line starts after the first has finished.
    proc, out = run_batch(default_model, tmp_path, [line, line], "--max-batch-size", "1", *flags)
    assert proc.returncode == 0, proc.stderr
    assert [r["usage"]["cached_prompt_tokens"] for r in out] == cached
    assert [r["usage"]["prompt_tokens"] for r in out] == [40, 40]
    assert out[0]["token_ids"] == out[1]["token_ids"]


def test_real_model_answers_equal_with_and_without_the_cache(smollm2_gguf: Path) -> None:
    """SmolLM2: two chats sharing a system prompt, one after the other, greedy; the second
    answer is the same with the cache (prefill after the cached prefix) as without."""
    backend = select_backend("cpu")
    checkpoint = load_checkpoint(smollm2_gguf, backend)
    config = EngineConfig(max_batch_size=4, kv_cache_mb=16, device="cpu")
    cached = BatchProcessor(checkpoint, config, backend)
    plain = BatchProcessor(checkpoint, dataclasses.replace(config, prefix_caching=False), backend)
    prompts = PromptEncoder.from_ready(EngineCore(cached).ready())
    system = {
        "role": "system",
        "content": "You are a concise assistant for a hardware store. Answer in one sentence, "
        "name the aisle when you can, and never invent prices.",
    }
    questions = ["Where are the screws?", "Do you sell paint?"]
    params = SamplingParams(max_new_tokens=8)
    hits = []
    for i, question in enumerate(questions):
        ids = prompts.encode_chat([system, {"role": "user", "content": question}])
        request = Request(f"q{i}", ids, params)
        got = run_to_completion(cached, [request])[request.request_id]
        want = run_to_completion(plain, [request])[request.request_id]
        assert got.token_ids == want.token_ids, question
        hits.append(got.cached_prompt_tokens)
    assert hits[0] == 0 and hits[1] >= 32  # the shared system prompt, in whole blocks
