"""Crash resumption end to end: SIGKILL a worker mid-stream, and nobody notices.

A dead worker's unfinished requests go back to the head of the pending queue with the
tokens they have and go on, on the restarted worker or another, from those tokens
(`Add.generated`). These tests kill real worker processes of a real server and compare
every completion with a fault-free run of the same requests: token ids, text, finish
reason. Live streams must see no gap and no repeat (each chunk's `index` follows on).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from service_harness import SERVING, RunningServer, ServerGroup, free_port, wait_for

from server.config import ServerConfig
from server.pending_queue import PendingQueue
from shoal.v1 import inference_pb2 as pb
from worker.channel.types import Priority

pytestmark = pytest.mark.timeout(150)
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
Result = tuple[list[int], str, int]  # token ids, text, finish reason


# -- helpers --------------------------------------------------------------------------------
def worker_pids(server_pid: int) -> list[int]:
    """Live `worker.process` children of a process, from /proc (no psutil)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == server_pid and b"worker.process" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def log_entries(server: RunningServer) -> list[dict]:
    """The JSON log lines (servers started with `--log-format json`)."""
    lines = server.log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def worker_pid(server: RunningServer, index: int) -> int:
    """The pid of worker `index` as last started (from the log), checked to be a child."""
    started = [m for e in log_entries(server) if (m := STARTED.match(e["msg"]))]
    pid = [int(m[2]) for m in started if int(m[1]) == index][-1]
    assert pid in worker_pids(server.process.pid)
    return pid


def request_lines(server: RunningServer) -> dict[str, dict]:
    return {e["request_id"]: e for e in log_entries(server) if e["logger"] == "shoal.requests"}


def collect(chunks, progress: dict[str, int] | None = None, key: str = "") -> Result:
    """Read a stream to its end, checking each chunk follows on from the last (no gap or
    repeat); `progress[key]` counts the tokens seen so far, for the test to watch."""
    tokens: list[int] = []
    text, finish = "", 0
    for chunk in chunks:
        assert chunk.index == len(tokens), f"{key}: chunk at {chunk.index} after {len(tokens)}"
        tokens += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
        if progress is not None:
            progress[key] = len(tokens)
    assert finish != pb.FINISH_REASON_UNSPECIFIED, f"{key}: no final chunk"
    return tokens, text, finish


def start(stub, request_id: str, fields: dict):
    return stub.Generate(pb.GenerateRequest(request_id=request_id, **fields), timeout=120)


def run_all(stub, requests: dict[str, dict]) -> dict[str, Result]:
    """Fault-free reference: every request at once, as the killed run sends them."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = {
            key: pool.submit(collect, stub.Generate(pb.GenerateRequest(**r), timeout=90))
            for key, r in requests.items()
        }
        return {key: f.result() for key, f in futures.items()}


def kill_and_wait_back(server: RunningServer, index: int = 0) -> None:
    pid = worker_pid(server, index)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: worker_pid_changed(server, index, pid), 60, f"worker {index} restarted")
    wait_for(lambda: server.health() == SERVING, 60, "SERVING again")


def worker_pid_changed(server: RunningServer, index: int, old: int) -> bool:
    started = [m for e in log_entries(server) if (m := STARTED.match(e["msg"]))]
    return [int(m[2]) for m in started if int(m[1]) == index][-1] != old


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# -- 16 requests, one kill ------------------------------------------------------------------
STOPPED = (2, 5, 10, 13)  # with a stop string taken from their own fault-free text
DETACHED = (3, 7, 10, 14)  # Submit now, Stream from 0 after the kill


def sixteen_requests() -> dict[str, dict]:
    requests = {}
    for i in range(16):
        r: dict = {"prompt": f"resume {i}: " + "abc " * i, "max_new_tokens": 90 + 5 * i}
        if i % 2:  # seeded sampling; the others greedy
            r.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        if i % 4 != 3:
            r["ignore_eos"] = True
        requests[f"r{i}"] = r
    return requests


def test_a_worker_killed_mid_stream_changes_no_completion(servers: ServerGroup) -> None:
    metrics = free_port()
    # Batch-invariant: a resumed request recomputes its tokens as a prefill, in batches other
    # than the fault-free run's; only then are its logits, and so its tokens, the same bits.
    server = servers.start(
        "--workers", "1", "--max-batch-size", "16", "--log-format", "json",
        "--metrics-port", str(metrics), "--batch-invariant",
    )  # fmt: skip
    stub = server.stub()
    requests = sixteen_requests()
    expected = run_all(stub, requests)
    for i in STOPPED:  # a stop string from late in its own text: it ends the request there
        _, text, _ = expected[f"r{i}"]
        stop = text[len(text) * 3 // 4 :][:3]
        assert stop, f"r{i} produced no text"
        requests[f"r{i}"]["stop"] = [stop]
    expected.update(run_all(stub, {f"r{i}": requests[f"r{i}"] for i in STOPPED}))
    assert any(expected[f"r{i}"][2] == pb.FINISH_REASON_STOP for i in STOPPED)

    # The same requests again (new ids); the worker is killed once each stream has tokens.
    progress: dict[str, int] = {}
    live: dict[str, Future] = {}
    with ThreadPoolExecutor(16) as pool:
        for key, r in requests.items():
            request = pb.GenerateRequest(request_id=f"k-{key}", **r)
            if int(key[1:]) in DETACHED:
                stub.Submit(request, timeout=10)
            else:
                live[key] = pool.submit(collect, start(stub, f"k-{key}", r), progress, key)
        wait_for(
            lambda: all(progress.get(k, 0) >= 8 or f.done() for k, f in live.items()),
            60,
            lambda: f"every live stream has tokens: {progress}",
        )
        at_kill = dict(progress)
        started = time.monotonic()
        kill_and_wait_back(server)
        got = {key: future.result() for key, future in live.items()}
        took = time.monotonic() - started
    for i in DETACHED:
        replay = stub.Stream(pb.StreamRequest(request_id=f"k-r{i}"), timeout=90)
        got[f"r{i}"] = collect(replay, key=f"r{i}")
        late = stub.Stream(pb.StreamRequest(request_id=f"k-r{i}", from_index=5), timeout=10)
        tail = [t for c in late for t in c.token_ids]
        assert tail == got[f"r{i}"][0][5:]

    for key in requests:
        assert got[key] == expected[key], f"{key}: differs from the fault-free run ({at_kill})"
    lines = {k: request_lines(server)[f"k-{k}"] for k in requests}
    resumed = [k for k, line in lines.items() if line["resumptions"] == 1]
    assert len(resumed) >= 12, (at_kill, lines)  # most were mid-stream when it died
    assert all(line["resumptions"] in (0, 1) and line["error"] is None for line in lines.values())
    assert scrape(metrics, "shoal_requests_resumed_total") == len(resumed)
    print(f"16 requests, {len(resumed)} resumed; kill to all streams done {took:.1f} s")


# -- logprobs across a resumption ---------------------------------------------------------
def test_logprobs_sent_before_a_kill_are_kept_and_new_tokens_get_theirs(
    servers: ServerGroup,
) -> None:
    """A resumed request's stream carries one TokenLogprob per token, before and after the
    kill; a replay from 0 gives the same ones; values match a fault-free run (to float
    rounding: the resumed request prefills what the first run decoded), penalties included."""
    server = servers.start("--workers", "1", "--log-format", "json")
    stub = server.stub()
    fields = {
        "prompt": "logprobs across a crash",
        "max_new_tokens": 300,  # still running when the worker dies
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": 77,
        "frequency_penalty": 0.8,
        "repetition_penalty": 1.2,
        "logprobs": True,
        "top_logprobs": 3,
    }
    expected = list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))
    progress: dict[str, int] = {}
    chunks: list[pb.GenerateChunk] = []

    def follow() -> None:
        for chunk in start(stub, "lp", fields):
            chunks.append(chunk)
            progress["lp"] = chunk.index + len(chunk.token_ids)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(follow)
        wait_for(lambda: progress.get("lp", 0) >= 10, 60, "tokens flow")
        kill_and_wait_back(server)
        done.result()
    assert request_lines(server)["lp"]["resumptions"] == 1
    for chunk in chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
    live = [lp for c in chunks for lp in c.logprobs]
    assert len(live) == 300
    replay = list(stub.Stream(pb.StreamRequest(request_id="lp"), timeout=30))
    assert [lp for c in replay for lp in c.logprobs] == live
    want = [lp for c in expected for lp in c.logprobs]
    assert [lp.token_id for lp in live] == [lp.token_id for lp in want]
    for got, ref in zip(live, want, strict=True):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t.token_id for t in got.top] == [t.token_id for t in ref.top]


# -- the same request at three deaths: a likely poison request -----------------------------
def test_a_request_on_its_worker_at_three_deaths_fails_and_the_others_go_on(
    servers: ServerGroup,
) -> None:
    server = servers.start("--workers", "1", "--log-format", "json")
    stub = server.stub()
    progress: dict[str, int] = {}
    others = {
        f"o{i}": {"prompt": f"other {i}", "max_new_tokens": 200, "ignore_eos": True, "seed": i}
        for i in range(3)
    }
    others["o1"].update(temperature=0.7)
    with ThreadPoolExecutor(4) as pool:
        poison = pb.GenerateRequest(
            request_id="poison", prompt="poison", max_new_tokens=2000, ignore_eos=True
        )
        doomed = pool.submit(collect, stub.Generate(poison, timeout=120), progress, "poison")
        wait_for(lambda: progress.get("poison", 0) >= 5, 30, "the poison request runs")
        for _ in range(2):  # killed twice, resumed twice, each time going on
            before = progress["poison"]
            kill_and_wait_back(server)
            wait_for(lambda b=before: progress["poison"] > b, 30, "resumed: tokens flow again")
        futures = {
            key: pool.submit(collect, start(stub, key, r), progress, key)
            for key, r in others.items()
        }
        wait_for(lambda: all(progress.get(k, 0) >= 3 for k in others), 30, "the others run")
        kill_and_wait_back(server)
        with pytest.raises(grpc.RpcError) as err:
            doomed.result()
        got = {key: f.result() for key, f in futures.items()}
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    message = "worker died 3 times while running this request; it may be a poison request"
    assert message in err.value.details(), err.value.details()
    assert got == run_all(stub, others)  # the others went on, unchanged by their resumption
    lines = request_lines(server)
    assert (lines["poison"]["resumptions"], lines["poison"]["error"]) == (2, "UNAVAILABLE")
    assert [lines[k]["resumptions"] for k in others] == [1, 1, 1]


# -- two workers: the survivor takes the load ----------------------------------------------
def test_with_two_workers_the_survivor_finishes_the_dead_ones_requests(
    servers: ServerGroup,
) -> None:
    server = servers.start("--workers", "2", "--max-batch-size", "16", "--log-format", "json")
    stub = server.stub()
    requests = {
        f"s{i}": {"prompt": f"survivor {i}", "max_new_tokens": 40, "ignore_eos": True}
        for i in range(8)
    }
    expected = run_all(stub, requests)
    progress: dict[str, int] = {}
    with ThreadPoolExecutor(8) as pool:
        futures = {
            key: pool.submit(collect, start(stub, f"k-{key}", r), progress, key)
            for key, r in requests.items()
        }
        wait_for(lambda: all(progress.get(k, 0) >= 2 for k in requests), 30, "all running")
        os.kill(worker_pid(server, 0), signal.SIGKILL)
        wait_for(lambda: any(e["msg"].startswith("worker 0 died") for e in log_entries(server)))
        assert server.health() == SERVING  # worker 1 still serves
        got = {key: f.result() for key, f in futures.items()}
    assert got == expected
    entries = log_entries(server)
    lines = {k: request_lines(server)[f"k-{k}"] for k in requests}
    resumed = [k for k, line in lines.items() if line["resumptions"] == 1]
    assert resumed and all(lines[k]["worker"] == 1 for k in resumed), lines
    ready = [e["ts"] for e in entries if e["msg"].startswith("worker 0 ready")]
    back = ready[1] if len(ready) > 1 else "~"  # ISO times sort as text; "~" after any
    finished = max(line["ts"] for line in lines.values())
    assert finished < back, f"all done at {finished}, worker 0 back at {back}"
    wait_for(lambda: len(worker_pids(server.process.pid)) == 2, 60, "worker 0 restarted")


# -- the pieces, without servers -----------------------------------------------------------
def test_requeue_keeps_the_original_rank_and_ignores_the_limit() -> None:
    queue: PendingQueue[str] = PendingQueue(max_queue_len=2, aging_s=10)
    queue.push("late", "late", Priority.NORMAL, now=5.0)
    queue.push("low", "low", Priority.LOW, now=0.5)
    queue.requeue("resumed", "resumed", Priority.NORMAL, arrival=1.0)  # full: still taken
    queue.requeue("first", "first", Priority.NORMAL, arrival=0.0)
    assert len(queue) == 4
    assert [queue.pop(now=6.0) for _ in range(4)] == ["first", "resumed", "late", "low"]
    queue.requeue("aged", "aged", Priority.LOW, arrival=0.0)  # waited 20 s: LOW -> HIGH
    queue.push("high", "high", Priority.HIGH, now=19.0)
    assert queue.pop(now=20.0) == "aged"


def test_max_resumptions_flag() -> None:
    assert ServerConfig(model="m").max_resumptions == 3
    assert ServerConfig.from_args(["--model", "m"], {"MAX_RESUMPTIONS": "5"}).max_resumptions == 5
    with pytest.raises(ValueError, match=r"max_resumptions \(--max-resumptions"):
        ServerConfig(model="m", max_resumptions=0)
