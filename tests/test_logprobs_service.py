"""Logprobs and penalties through every entry point of a real server, and the offline runner.

gRPC (Generate, Submit + Stream replays), the Python client and `python -m client`, and
`python -m worker.batch` JSONL, against the in-process engine on the same random-weight
model. (The OpenAI-compatible API: tests/test_http_api.py; crash resumption:
tests/test_resume.py; the numbers themselves: tests/test_logprobs.py and
tests/test_real_logprobs.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from service_harness import REPO, RunningServer, ServerGroup, run_batch

from client import ShoalClient
from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams, TokenLogprob

pytestmark = pytest.mark.timeout(180)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    # Batch-invariant, so its logprobs equal a lone in-process engine's to the bit.
    return module_servers.start(
        "--workers", "1", "--max-batch-size", "8", "--kv-cache-mb", "16", "--batch-invariant"
    )  # fmt: skip


def generate(server: RunningServer, **fields: Any) -> list[pb.GenerateChunk]:
    return list(server.stub().Generate(pb.GenerateRequest(**fields), timeout=60))


def plain(logprobs: Any) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """TokenLogprobs of any side (proto, channel, client) as plain tuples."""
    out = []
    for lp in logprobs:
        top = [(t.token_id, t.logprob) if hasattr(t, "token_id") else tuple(t) for t in lp.top]
        out.append((lp.token_id, lp.logprob, top))
    return out


def from_json(logprobs: list[dict]) -> list[TokenLogprob]:
    """The JSONL form ({"token_id", "logprob", "top": [...]}) back to TokenLogprobs."""
    return [
        TokenLogprob(
            lp["token_id"], lp["logprob"], tuple((t["token_id"], t["logprob"]) for t in lp["top"])
        )
        for lp in logprobs
    ]


def engine(make_processor, prompt: list[int], **params: Any) -> Any:
    request = Request("x", prompt, SamplingParams(**params))
    return run_to_completion(make_processor(batch_invariant=True), [request])["x"]


def test_grpc_chunks_carry_one_logprob_per_token_as_the_engine_computes(
    server: RunningServer, make_processor
) -> None:
    fields = dict(
        prompt_token_ids=PROMPT, max_new_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    with ThreadPoolExecutor(2) as pool:  # one asking and one not, in the same batch
        asking = pool.submit(generate, server, **fields)
        other = pool.submit(generate, server, prompt_token_ids=PROMPT, max_new_tokens=12)
        chunks, others = asking.result(), other.result()
    for chunk in chunks:
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
        assert all(len(lp.top) == 3 for lp in chunk.logprobs)
    assert all(not c.logprobs for c in others)
    want = engine(make_processor, PROMPT, max_new_tokens=12, ignore_eos=True, logprobs=True,
                  top_logprobs=3)  # fmt: skip
    got = [lp for c in chunks for lp in c.logprobs]
    assert plain(got) == plain(want.logprobs)
    assert all(lp.top[0].token_id == lp.token_id for lp in got)  # greedy: the most likely


def test_stream_replays_carry_the_same_logprobs(server: RunningServer) -> None:
    stub = server.stub()
    fields = dict(prompt="The tide", max_new_tokens=16, temperature=0.9, seed=5, ignore_eos=True,
                  logprobs=True, top_logprobs=2)  # fmt: skip
    live = generate(server, **fields)
    request_id = stub.Submit(pb.GenerateRequest(**fields)).request_id
    replay = list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=0), timeout=60))
    tail = list(stub.Stream(pb.StreamRequest(request_id=request_id, from_index=9), timeout=60))
    everything = plain(lp for c in live for lp in c.logprobs)
    assert len(everything) == 16
    assert plain(lp for c in replay for lp in c.logprobs) == everything
    assert plain(lp for c in tail for lp in c.logprobs) == everything[9:]
    assert tail[0].index == 9 and len(tail[0].logprobs) == len(tail[0].token_ids)


def test_seeded_sampling_and_penalties_are_the_engines(
    server: RunningServer, make_processor
) -> None:
    base = dict(max_new_tokens=14, temperature=1.1, seed=9, ignore_eos=True)
    penalties = dict(repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=-0.5)
    without = generate(server, prompt_token_ids=PROMPT, **base, **penalties)
    asked = generate(server, prompt_token_ids=PROMPT, **base, **penalties, logprobs=True)
    tokens = [t for c in without for t in c.token_ids]
    assert tokens == [t for c in asked for t in c.token_ids]  # asking changes no token
    want = engine(make_processor, PROMPT, **base, **penalties)
    assert tokens == want.token_ids
    assert tokens != engine(make_processor, PROMPT, **base).token_ids  # the penalties mattered


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20] (got 21)"),
        ({"top_logprobs": 2}, "top_logprobs (2) needs logprobs to be true"),
        ({"repetition_penalty": 250.0}, "repetition_penalty must be 0 (off) or in [0.01, 100]"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be 0 (off) or in [0.01, 100]"),
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2] (got 2.5)"),
        ({"presence_penalty": float("nan")}, "presence_penalty must be in [-2, 2] (got nan)"),
    ],
)
def test_bad_values_are_invalid_argument(server: RunningServer, fields: dict, words: str) -> None:
    request = pb.GenerateRequest(prompt="x", max_new_tokens=2, **fields)
    with pytest.raises(grpc.RpcError) as err:
        server.stub().Submit(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_python_client_and_cli(server: RunningServer) -> None:
    with ShoalClient(server.target, timeout=30) as client:
        done = client.generate_text(
            prompt_token_ids=PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=True,
            top_logprobs=2, repetition_penalty=1.2,
        )  # fmt: skip
        assert [lp.token_id for lp in done.logprobs] == list(done.token_ids)
        assert all(len(lp.top) == 2 for lp in done.logprobs)
        assert done.logprobs[0].as_dict()["top"][0]["token_id"] == done.token_ids[0]
        assert client.generate_text(prompt_token_ids=PROMPT, max_new_tokens=3).logprobs == ()

    def cli(*argv: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run(
            [sys.executable, "-m", "client", "--target", server.target, *argv],
            cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    common = ("generate", "--token-ids", "5,6,7,8,9", "--max-new-tokens", "6", "--ignore-eos")
    shown = cli(*common, "--logprobs", "2", "--repetition-penalty", "1.2")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith("logprob ")]
    assert len(lines) == 6
    for i, (line, lp) in enumerate(zip(lines, done.logprobs, strict=True)):
        assert line.startswith(f"logprob {i} token={lp.token_id} {lp.logprob:.4f} top ")
        assert len(line.split(" top ")[1].split()) == 2
    streamed = cli(*common, "--stream", "--logprobs", "0")
    assert len([s for s in streamed.stderr.splitlines() if s.startswith("logprob ")]) == 6
    assert "logprob " not in cli(*common).stderr
    bad = cli(*common, "--presence-penalty", "3")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: INVALID_ARGUMENT: presence_penalty must be in [-2, 2]")


def test_jsonl_offline_and_through_the_server(
    default_model: Path, tmp_path: Path, server: RunningServer, make_processor
) -> None:
    lines = [
        {"request_id": "lp", "prompt_token_ids": PROMPT, "max_new_tokens": 5,
         "ignore_eos": True, "logprobs": True, "topLogprobs": 2},
        {"request_id": "none", "prompt_token_ids": PROMPT, "max_new_tokens": 5,
         "ignore_eos": True, "frequency_penalty": 1.5},
        {"request_id": "bad", "prompt": "x", "max_new_tokens": 2, "top_logprobs": 4},
        {"request_id": "bad2", "prompt": "x", "max_new_tokens": 2, "repetition_penalty": 1000},
    ]  # fmt: skip
    proc, records = run_batch(default_model, tmp_path, lines, "--batch-invariant")
    assert proc.returncode == 1, proc.stderr
    by_id = {r["request_id"]: r for r in records}
    want = engine(make_processor, PROMPT, max_new_tokens=5, ignore_eos=True, logprobs=True,
                  top_logprobs=2)  # fmt: skip
    assert by_id["lp"]["token_ids"] == want.token_ids
    assert plain(from_json(by_id["lp"]["logprobs"])) == plain(want.logprobs)
    assert "logprobs" not in by_id["none"]
    penalised = engine(make_processor, PROMPT, max_new_tokens=5, ignore_eos=True,
                       frequency_penalty=1.5)  # fmt: skip
    assert by_id["none"]["token_ids"] == penalised.token_ids
    assert "top_logprobs (4) needs logprobs to be true" in by_id["bad"]["error"]
    assert "repetition_penalty must be 0 (off) or in [0.01, 100]" in by_id["bad2"]["error"]

    # `python -m client batch` writes the same records through the server.
    src, out = tmp_path / "client-in.jsonl", tmp_path / "client-out.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "client", "--target", server.target, "batch",
         "--input", str(src), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    served = {r["request_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert served["lp"]["logprobs"] == by_id["lp"]["logprobs"]
    assert "logprobs" not in served["none"]
    assert served["none"]["token_ids"] == by_id["none"]["token_ids"]
