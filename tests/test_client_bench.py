"""`python -m client bench`: the load generator against a real server (no timing asserts)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO, ServerGroup

from client.bench import BenchPlan, LengthDist, arrival_schedule, percentiles


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
