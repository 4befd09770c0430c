"""`python -m client bench`: the load generator against a real server (no timing asserts),
through gRPC and through the OpenAI-compatible HTTP API (`--api openai`)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO, RunningServer, ServerGroup, free_port

from client.aio import AsyncShoalClient
from client.bench import BenchPlan, LengthDist, arrival_schedule, percentiles, run_bench
from client.bench_openai import OpenAIDriver, base_url
from client.cli import parse_args


def test_length_distributions_parse_and_reject() -> None:
    assert LengthDist.parse("128") == LengthDist(128, 128)
    assert LengthDist.parse("16:512") == LengthDist(16, 512)
    for bad in ("0", "9:3", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="LOW:HIGH"):
            LengthDist.parse(bad)


def test_poisson_arrivals_have_the_requested_rate() -> None:
    plan = BenchPlan(
        requests=5000, rate=20.0, prompt_len=LengthDist(1, 1), output_len=LengthDist(1, 1)
    )
    times = arrival_schedule(plan, random.Random(3))
    assert times[0] == 0.0 and times == sorted(times)
    assert 4500 / 20 < times[-1] < 5500 / 20  # mean gap 1/rate
    burst = BenchPlan(
        requests=5, rate=float("inf"), prompt_len=plan.prompt_len, output_len=plan.output_len
    )
    assert arrival_schedule(burst, random.Random(3)) == [0.0] * 5


def test_percentiles_use_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"mean": 50.5, "p50": 50.0, "p90": 90.0, "p99": 99.0}


def test_bench_cli_records_every_request(servers: ServerGroup, tmp_path: Path) -> None:
    # `servers` stops it at teardown: exit status 0, no segments left.
    server = servers.start("--workers", "1", "--max-batch-size", "8")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "--target",
            server.target,
            "bench",
            "--requests",
            "12",
            "--rate",
            "50",
            "--concurrency",
            "6",
            "--prompt-len",
            "4:16",
            "--output-len",
            "3:9",
            "--seed",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for heading in (
        "request throughput",
        "output tokens/s",
        "| TTFT |",
        "| TPOT |",
        "| ITL |",
        "| E2E |",
    ):
        assert heading in proc.stdout
    assert "errors: none" in proc.stdout
    report = json.loads(out.read_text())
    records = report["records"]
    assert len(records) == 12 and report["summary"]["completed"] == 12
    for r in records:
        assert 4 <= r["prompt_tokens"] <= 16 and 3 <= r["max_new_tokens"] <= 9
        assert r["output_tokens"] == r["max_new_tokens"] and r["error"] is None
        assert r["e2e_ms"] >= r["ttft_ms"] > 0
        assert len(r["chunk_times_s"]) >= 1
    assert report["summary"]["output_tokens"] == sum(r["max_new_tokens"] for r in records)


# -- the OpenAI-compatible HTTP API (--api openai) ------------------------------------------


@pytest.fixture(scope="module")
def http_server(module_servers: ServerGroup) -> RunningServer:
    """One server with gRPC and HTTP for the module's tests (stopped and checked after)."""
    return module_servers.start(
        "--workers", "1", "--max-batch-size", "8", "--http-port", str(free_port())
    )


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


PLAN = ("--requests", "8", "--concurrency", "4", "--prompt-len", "4:16", "--output-len", "3:9")


def records_of(path: Path) -> list[dict]:
    report = json.loads(path.read_text())
    assert report["summary"]["completed"] == report["summary"]["requests"]
    return report["records"]


def test_openai_api_runs_the_same_plan_as_grpc(http_server: RunningServer, tmp_path: Path) -> None:
    """Same seed, same prompts and lengths; exact token counts from the stream's usage."""
    via_grpc, via_http = tmp_path / "grpc.json", tmp_path / "http.json"
    proc = bench("--target", http_server.target, "bench", *PLAN, "--json", str(via_grpc))
    assert proc.returncode == 0, proc.stderr
    proc = bench(
        "bench", "--api", "openai", "--http-target", http_server.http, *PLAN,
        "--json", str(via_http),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"api: openai {http_server.http}/v1 (completions)" in proc.stdout
    for heading in ("output tokens/s", "| TTFT |", "| TPOT |", "| ITL |", "| E2E |"):
        assert heading in proc.stdout
    assert "errors: none" in proc.stdout
    http_records, grpc_records = records_of(via_http), records_of(via_grpc)
    assert json.loads(via_http.read_text())["api"] == "openai"

    def shape(r: dict) -> tuple:
        return r["prompt_tokens"], r["max_new_tokens"], r["scheduled_s"]

    assert [shape(r) for r in http_records] == [shape(r) for r in grpc_records]
    for r in http_records:
        assert r["output_tokens"] == r["max_new_tokens"] and r["error"] is None
        assert r["e2e_ms"] >= r["ttft_ms"] > 0
        # One chunk per token that has text (the toy tokenizer's half characters have none).
        assert 1 <= len(r["chunk_times_s"]) <= r["output_tokens"]


def test_openai_driver_finds_the_served_vocab_size(http_server: RunningServer) -> None:
    async def sizes() -> tuple[int, int]:
        async with AsyncShoalClient(http_server.target) as client:
            grpc_vocab = (await client.model_info()).vocab_size
        async with OpenAIDriver(http_server.http) as driver:
            return grpc_vocab, await driver.vocab_size()

    grpc_vocab, http_vocab = asyncio.run(sizes())
    assert http_vocab == grpc_vocab


def test_run_bench_takes_an_async_client(http_server: RunningServer) -> None:
    """scripts/bench_serving.py and bench_sweep.py pass an AsyncShoalClient itself."""
    plan = BenchPlan(requests=3, rate=float("inf"), prompt_len=LengthDist(4, 8),
                     output_len=LengthDist(2, 4), seed=2)  # fmt: skip

    async def run() -> list:
        async with AsyncShoalClient(http_server.target) as client:
            return (await run_bench(client, plan))[0]

    records = asyncio.run(run())
    assert [r.output_tokens for r in records] == [r.max_new_tokens for r in records]


def test_openai_api_chat_endpoint(http_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    # host:port without a scheme, the default is http://; /v1 already given is kept
    target = http_server.http.removeprefix("http://") + "/v1"
    proc = bench(
        "bench", "--api", "openai", "--endpoint", "chat", "--http-target", target,
        "--requests", "3", "--prompt-len", "4:8", "--output-len", "2:5", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(chat)" in proc.stdout and "errors: none" in proc.stdout
    for r in records_of(out):
        assert r["output_tokens"] == r["max_new_tokens"]
        assert r["prompt_tokens"] > 4  # the words, in the chat template, as the server counts


def test_openai_api_failures_are_named(http_server: RunningServer, tmp_path: Path) -> None:
    # Every request refused with 400 (max_tokens over the server's limit): counted, exit 1.
    out = tmp_path / "refused.json"
    proc = bench(
        "bench", "--http-target", http_server.http, "--requests", "3", "--prompt-len", "4",
        "--output-len", "100000000", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "HTTP_400 x3" in proc.stdout
    # Nothing listening: one line naming the failure, no traceback.
    proc = bench("bench", "--http-target", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert proc.returncode == 1
    assert "CONNECTION_ERROR" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_HTTP_TARGET", raising=False)
    assert parse_args(["bench"]).api == "grpc"
    args = parse_args(["bench", "--api", "openai"])
    assert args.http_target == "http://127.0.0.1:8000"
    assert parse_args(["bench", "--http-target", "h:1"]).api == "openai"
    monkeypatch.setenv("SHOAL_HTTP_TARGET", "http://h:2")
    assert parse_args(["bench", "--api", "openai"]).http_target == "http://h:2"
    for wrong in (["--http-target", "h:1", "--api", "grpc"], ["--endpoint", "chat"]):
        with pytest.raises(SystemExit):
            parse_args(["bench", *wrong])
    assert base_url("h:1") == "http://h:1/v1"
    assert base_url("https://h/v1/") == "https://h/v1"


def test_openai_is_needed_only_for_api_openai(tmp_path: Path) -> None:
    """Without the package: gRPC bench imports nothing of it; --api openai says what to install."""
    (tmp_path / "openai.py").write_text("raise ImportError('openai is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    check = "import sys, client.commands; assert 'openai' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    proc = bench("bench", "--api", "openai", "--requests", "1", env=env)
    assert proc.returncode == 1
    assert "needs the openai package" in proc.stderr and "Traceback" not in proc.stderr
