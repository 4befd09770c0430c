"""The Prometheus endpoint of a real server, scraped over HTTP while requests run.

Counters are checked as exact deltas between scrapes; the request log lines
(`--log-format json`) are checked against the same requests.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import RunningServer, ServerGroup, free_port, wait_for

from shoal.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(180)


class Scrape:
    """One scrape of /metrics: samples by name and labels."""

    def __init__(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        self.samples = [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def sum(self, name: str, **labels: str) -> float:
        """Sum over the samples named `name` whose labels include `labels`."""
        return sum(
            value for n, have, value in self.samples if n == name and labels.items() <= have.items()
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= have.items() for n, have, _ in self.samples)


def scrape_until(port: int, ok: Callable[[Scrape], bool], timeout: float = 15) -> Scrape:
    """The first scrape that satisfies `ok` (worker Status messages and RPC ends land a
    moment later); TimeoutError, with the last scrape's counts, if none does in time."""
    last: list[Scrape] = []

    def scrape() -> Scrape | None:
        last[:] = [Scrape(port)]
        return last[0] if ok(last[0]) else None

    def details() -> str:
        return f"the metrics condition; last counts: {counts(last[0]) if last else None}"

    return wait_for(scrape, timeout, details, interval=0.05)


COUNTED = {  # what the deltas below are computed over, by (sample name, labels)
    "ok_generate": ("shoal_requests_total", {"rpc": "Generate", "code": "OK"}),
    "ok_submit": ("shoal_requests_total", {"rpc": "Submit", "code": "OK"}),
    "ok_stream": ("shoal_requests_total", {"rpc": "Stream", "code": "OK"}),
    "ok_cancel": ("shoal_requests_total", {"rpc": "Cancel", "code": "OK"}),
    "ok_stats": ("shoal_requests_total", {"rpc": "GetStats", "code": "OK"}),
    "invalid": ("shoal_requests_total", {"rpc": "Submit", "code": "INVALID_ARGUMENT"}),
    "not_found": ("shoal_requests_total", {"rpc": "Cancel", "code": "NOT_FOUND"}),
    "tokens": ("shoal_generated_tokens_total", {}),
    "length": ("shoal_requests_finished_total", {"reason": "length"}),
    "cancelled": ("shoal_requests_finished_total", {"reason": "cancelled"}),
    "queue_time": ("shoal_queue_time_seconds_count", {}),
    "ttft": ("shoal_ttft_seconds_count", {}),
    "inter_token": ("shoal_inter_token_latency_seconds_count", {}),
    "latency": ("shoal_request_latency_seconds_count", {}),
    "restarts": ("shoal_worker_restarts_total", {}),
}


def counts(scrape: Scrape) -> dict[str, float]:
    return {key: scrape.sum(name, **labels) for key, (name, labels) in COUNTED.items()}


def moved(before: Scrape, expected: dict[str, float]) -> Callable[[Scrape], bool]:
    base = counts(before)
    return lambda now: all(counts(now)[k] - base[k] == v for k, v in expected.items())


def deltas(before: Scrape, after: Scrape) -> dict[str, float]:
    base = counts(before)
    return {k: v - base[k] for k, v in counts(after).items()}


def streamed(chunks: list[pb.GenerateChunk]) -> int:
    return sum(len(c.token_ids) for c in chunks)


@pytest.fixture(scope="module")
def served(module_servers: ServerGroup) -> tuple[RunningServer, int]:
    # module_servers stops it after the module and checks exit status 0 and no segments left.
    port = free_port()
    flags = ("--workers", "2", "--max-batch-size", "4", "--kv-cache-mb", "16")
    running = module_servers.start(*flags, "--metrics-port", str(port), "--log-format", "json")
    return running, port


def test_counters_histograms_gauges_and_restarts_move_as_requests_run(
    served: tuple[RunningServer, int],
) -> None:
    server, port = served
    stub = server.stub()
    start = Scrape(port)
    for worker in ("0", "1"):
        assert start.sum("shoal_worker_up", worker=worker) == 1
        assert start.sum("shoal_kv_blocks_total", worker=worker) > 0
        for name in ("shoal_active_sequences", "shoal_batch_utilization", "shoal_kv_blocks_used"):
            assert start.has(name, worker=worker), name
    for priority in ("high", "normal", "low"):
        assert start.sum("shoal_queue_length", priority=priority) == 0

    # Requests with known lengths: exact deltas.
    lengths = [5, 7, 9]
    for i, n in enumerate(lengths):
        request = pb.GenerateRequest(
            request_id=f"m{i}",
            prompt_token_ids=[3, 4, 5 + i],
            max_new_tokens=n,
            ignore_eos=True,
            priority=pb.PRIORITY_HIGH,
        )
        assert streamed(list(stub.Generate(request, timeout=60))) == n
    stub.Submit(
        pb.GenerateRequest(request_id="m-sub", prompt="x", max_new_tokens=6, ignore_eos=True)
    )
    assert streamed(list(stub.Stream(pb.StreamRequest(request_id="m-sub"), timeout=60))) == 6
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(pb.GenerateRequest(prompt="x", max_new_tokens=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Cancel(pb.CancelRequest(request_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub.GetStats(pb.GetStatsRequest())
    tokens, requests = sum(lengths) + 6, len(lengths) + 1
    expected = {
        "ok_generate": 3,
        "ok_submit": 1,
        "ok_stream": 1,
        "ok_stats": 1,
        "invalid": 1,
        "not_found": 1,
        "tokens": tokens,
        "length": requests,
        "queue_time": requests,
        "ttft": requests,
        "inter_token": tokens - requests,  # every token after a request's first
        "latency": requests,
    }
    middle = scrape_until(port, moved(start, expected))
    assert deltas(start, middle) == {**dict.fromkeys(COUNTED, 0), **expected}
    assert middle.sum("shoal_queue_time_seconds_count", priority="high") == 3

    # A long request, scraped while it runs, then cancelled.
    long_id = stub.Submit(
        pb.GenerateRequest(prompt="long", max_new_tokens=1500, ignore_eos=True)
    ).request_id
    stream = stub.Stream(pb.StreamRequest(request_id=long_id), timeout=60)
    first = next(stream)
    running = scrape_until(port, lambda s: s.sum("shoal_active_sequences") >= 1)
    assert running.sum("shoal_batch_utilization") >= 0.25  # 1 of 4 slots on its worker
    assert running.sum("shoal_kv_blocks_used") >= 1
    assert stub.Cancel(pb.CancelRequest(request_id=long_id)).cancelled
    got = len(first.token_ids) + streamed(list(stream))
    after_long = scrape_until(port, lambda s: s.sum("shoal_active_sequences") == 0)
    change = deltas(middle, after_long)
    assert change["ok_submit"] == change["ok_stream"] == change["ok_cancel"] == 1
    assert change["cancelled"] == 1 and change["tokens"] >= got  # the worker may run ahead
    assert after_long.sum("shoal_kv_blocks_used") == 0

    # A killed worker: restarts counts it, and the token counter does not go back.
    pids = [
        int(entry["msg"].split("pid ")[1].rstrip(")"))
        for entry in log_entries(server)
        if entry["msg"].startswith("worker 0 started")
    ]
    os.kill(pids[-1], signal.SIGKILL)
    restarted = scrape_until(
        port,
        lambda s: (
            s.sum("shoal_worker_restarts_total") == 1 and s.sum("shoal_worker_up", worker="0") == 1
        ),
        timeout=60,
    )
    for i in range(4):  # spread over both workers, the new one included
        request = pb.GenerateRequest(prompt=f"after {i}", max_new_tokens=4, ignore_eos=True)
        assert streamed(list(stub.Generate(request, timeout=60))) == 4
    # Exactly 16 more tokens than before the restart: the counter did not go back to 0.
    scrape_until(port, moved(restarted, {"tokens": 16, "length": 4}))


def log_entries(server: RunningServer) -> list[dict]:
    entries = []
    for line in server.log.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def test_json_log_has_one_line_per_finished_request(served: tuple[RunningServer, int]) -> None:
    server, _ = served
    stub = server.stub()
    request = pb.GenerateRequest(
        request_id="logged",
        prompt_token_ids=[7, 8, 9, 10],
        max_new_tokens=6,
        ignore_eos=True,
        priority=pb.PRIORITY_LOW,
    )
    assert streamed(list(stub.Generate(request, timeout=60))) == 6
    lines = wait_for(
        lambda: [e for e in log_entries(server) if e.get("request_id") == "logged"],
        10,
        "a request log line for 'logged'",
        interval=0.05,
    )
    assert len(lines) == 1, lines
    entry = lines[0]
    assert entry["logger"] == "shoal.requests" and entry["level"] == "INFO"
    assert entry["priority"] == "low"
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (4, 6)
    assert entry["finish_reason"] == "length" and entry["error"] is None
    assert entry["worker"] in (0, 1)
    assert 0 <= entry["queue_ms"] <= entry["ttft_ms"] <= entry["total_ms"]
    # The front's other lines are JSON too.
    assert any("listening on" in e["msg"] for e in log_entries(server))
