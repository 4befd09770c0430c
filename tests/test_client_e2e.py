"""The client library and `python -m client` against real servers (`python -m server`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from service_harness import REPO, RunningServer, ServerGroup, free_port, wait_for
from tokenizers import Tokenizer

from client import AsyncShoalClient, Chunk, Completion, ShoalClient, ShoalError
from client.batch import count_failed, parse_lines, run_batch
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams

pytestmark = pytest.mark.timeout(120)

FLAGS = ("--workers", "1", "--max-batch-size", "8", "--kv-cache-mb", "16")
TIMEOUT = 30.0  # the default deadline of every client call in this file
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LONG = 2000  # max_new_tokens of a request that is still running when the test acts on it


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    # module_servers stops it after the module and checks exit status 0 and no segments left.
    return module_servers.start(*FLAGS)


@pytest.fixture
def shoal(server: RunningServer) -> Iterator[ShoalClient]:
    with ShoalClient(server.target, timeout=TIMEOUT) as client:
        yield client


def joined(chunks: list[Chunk]) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def check_chunk_sequence(chunks: list[Chunk], start: int = 0) -> None:
    """Indices follow the tokens; only the last chunk carries finish, usage and timing."""
    position = start
    for chunk in chunks:
        assert chunk.index == position
        position += len(chunk.token_ids)
    *running, last = chunks
    assert all(c.finish_reason is None and c.usage is None for c in running)
    assert last.finish_reason is not None and last.usage is not None and last.timing is not None
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id


def idle(client: ShoalClient) -> bool:
    stats = client.stats()
    total = stats.total
    busy = total.active_sequences or total.kv_blocks_used or total.queue_length
    return not busy and stats.pending_queue_length == 0


# --- sync client ------------------------------------------------------------------------


def test_generate_streams_the_tokens_of_the_in_process_engine(
    shoal: ShoalClient, model_tokenizer: Tokenizer, make_processor: Callable
) -> None:
    prompt = [7, 8, 9, 10, 11]
    chunks = list(shoal.generate(prompt_token_ids=prompt, max_new_tokens=12, ignore_eos=True))
    check_chunk_sequence(chunks)
    tokens, text = joined(chunks)
    last = chunks[-1]
    assert last.finish_reason == "LENGTH"
    assert last.usage and (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 12)
    assert last.timing and last.timing.total_ms >= last.timing.ttft_ms >= last.timing.queue_ms
    local = run_to_completion(
        make_processor(), [Request("r", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    )
    assert tokens == local["r"].token_ids
    assert text == model_tokenizer.decode(tokens)

    done = shoal.generate_text(prompt_token_ids=prompt, max_new_tokens=12, ignore_eos=True)
    assert isinstance(done, Completion) and done.request_id and done.request_id != last.request_id
    assert (list(done.token_ids), done.text, done.finish_reason) == (tokens, text, "LENGTH")
    assert done.usage == last.usage

    named = shoal.generate_text("hello", max_new_tokens=5, request_id="e2e-named")
    assert named.request_id == "e2e-named" and named.usage
    assert named.usage.completion_tokens == len(named.token_ids) <= 5
    assert named.finish_reason in ("LENGTH", "EOS")


def test_submit_then_stream_replays_from_any_index(shoal: ShoalClient) -> None:
    fields: dict[str, Any] = dict(max_new_tokens=16, temperature=0.8, seed=11, ignore_eos=True)
    direct = shoal.generate_text("The tide comes in", **fields)
    request_id = shoal.submit("The tide comes in", **fields, request_id="e2e-submit")
    assert request_id == "e2e-submit"
    whole = list(shoal.stream(request_id))
    check_chunk_sequence(whole)
    assert joined(whole) == (list(direct.token_ids), direct.text)  # same seed, same tokens
    tail = list(shoal.stream(request_id, from_index=10))
    check_chunk_sequence(tail, start=10)
    assert joined(tail)[0] == list(direct.token_ids[10:])
    assert tail[-1].usage == whole[-1].usage and tail[-1].finish_reason == "LENGTH"
    server_chosen = {shoal.submit(prompt_token_ids=[1, 2], max_new_tokens=2) for _ in range(3)}
    assert len(server_chosen) == 3 and "" not in server_chosen  # unique ids picked by the server


def test_cancel_and_leaving_a_stream_early_free_the_slot(shoal: ShoalClient) -> None:
    request_id = shoal.submit(prompt_token_ids=[3, 4], max_new_tokens=LONG, ignore_eos=True)
    stream = shoal.stream(request_id)
    next(stream)  # it is running
    wait_for(lambda: shoal.stats().total.active_sequences == 1, message="running")  # stats lag
    assert shoal.cancel(request_id) is True
    rest = list(stream)
    assert rest[-1].finish_reason == "CANCELLED" and rest[-1].usage is not None
    wait_for(lambda: idle(shoal), message="idle after the cancel")
    assert shoal.cancel(request_id) is False  # already finished
    with pytest.raises(ShoalError) as err:
        shoal.cancel("no-such-request")
    assert err.value.code is grpc.StatusCode.NOT_FOUND and "no-such-request" in err.value.details

    generation = shoal.generate(prompt_token_ids=[5], max_new_tokens=LONG, ignore_eos=True)
    first = next(generation)
    assert first.index == 0
    wait_for(lambda: shoal.stats().total.active_sequences == 1, message="running")
    generation.close()  # leaving early cancels the call, and the server aborts the request
    wait_for(lambda: idle(shoal), message="idle after leaving the stream")
    assert list(shoal.stream(first.request_id))[-1].finish_reason == "CANCELLED"


def test_stats_and_model_info(shoal: ShoalClient) -> None:
    info = shoal.model_info()
    assert (info.name, info.architecture, info.vocab_size, info.max_context) == (
        "default",
        "llama",
        512,
        2048,
    )
    assert info.eos_token_ids == (0,) and info.device.startswith("cpu")
    assert info.max_new_tokens_limit == 4096
    before = shoal.stats().total.total_tokens
    shoal.generate_text(prompt_token_ids=[1], max_new_tokens=6, ignore_eos=True)
    wait_for(lambda: shoal.stats().total.total_tokens == before + 6, message="6 more tokens")
    stats = shoal.stats()
    assert [w.worker for w in stats.workers] == [0] and stats.workers[0].alive
    assert stats.total.worker == -1 and stats.total.alive
    assert stats.total.kv_blocks_total == stats.workers[0].kv_blocks_total > 0
    assert stats.as_dict()["total"]["total_tokens"] == before + 6


def test_failed_calls_raise_shoal_error_with_the_server_status(
    shoal: ShoalClient, server: RunningServer
) -> None:
    def fails(call: Callable[[], object]) -> ShoalError:
        with pytest.raises(ShoalError) as err:
            call()
        assert isinstance(err.value, grpc.RpcError)  # `except grpc.RpcError` still works
        assert isinstance(err.value.__cause__, grpc.RpcError)
        return err.value

    for call in (
        lambda: list(shoal.generate("hi", max_new_tokens=0)),
        lambda: shoal.generate_text("hi", max_new_tokens=0),
        lambda: shoal.submit("hi", max_new_tokens=0),
    ):
        err = fails(call)
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in err.details
        assert str(err) == f"INVALID_ARGUMENT: {err.details}"
    err = fails(lambda: shoal.submit("x", prompt_token_ids=[1], max_new_tokens=2))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.details
    err = fails(lambda: shoal.generate_text(prompt_token_ids=[1, 512], max_new_tokens=2))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "512" in err.details
    shoal.submit("x", max_new_tokens=2, request_id="e2e-dup")
    err = fails(lambda: shoal.submit("x", max_new_tokens=2, request_id="e2e-dup"))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "already in use" in err.details
    err = fails(lambda: list(shoal.stream("e2e-missing")))
    assert err.code is grpc.StatusCode.NOT_FOUND and "e2e-missing" in err.details
    with pytest.raises(ValueError, match="priority"):  # caught before anything is sent
        shoal.submit("x", priority="URGENT")

    late = dict(prompt_token_ids=[1], max_new_tokens=LONG, ignore_eos=True)
    err = fails(lambda: shoal.generate_text(**late, request_id="e2e-late", timeout=0.3))
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    # The deadline aborted the request on the server, long before it could have finished.
    assert list(shoal.stream("e2e-late"))[-1].finish_reason == "CANCELLED"
    wait_for(lambda: idle(shoal), message="idle after the deadline")

    nowhere = f"127.0.0.1:{free_port()}"
    with ShoalClient(nowhere, timeout=5) as down:
        assert fails(down.stats).code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TimeoutError, match=nowhere):
            down.wait_ready(0.3)
    with ShoalClient(nowhere, timeout=0.5, wait_for_ready=True) as waiting:
        assert fails(waiting.stats).code is grpc.StatusCode.DEADLINE_EXCEEDED


# --- asyncio client ------------------------------------------------------------------------


def test_async_client(server: RunningServer, shoal: ShoalClient) -> None:
    prompts = [[i, i + 1, i + 2] for i in range(1, 9)]
    expected = [
        shoal.generate_text(prompt_token_ids=p, max_new_tokens=8, ignore_eos=True).token_ids
        for p in prompts
    ]

    async def calls() -> None:
        async with AsyncShoalClient(server.target, timeout=TIMEOUT) as client:
            await client.wait_ready(10)
            chunks = [
                c
                async for c in client.generate(
                    prompt_token_ids=prompts[0], max_new_tokens=8, ignore_eos=True
                )
            ]
            check_chunk_sequence(chunks)
            assert tuple(joined(chunks)[0]) == expected[0]
            done = await asyncio.gather(
                *(
                    client.generate_text(prompt_token_ids=p, max_new_tokens=8, ignore_eos=True)
                    for p in prompts
                )
            )
            assert [d.token_ids for d in done] == expected  # concurrent, batched, same tokens
            assert all(d.finish_reason == "LENGTH" for d in done)

            request_id = await client.submit(
                prompt_token_ids=prompts[1], max_new_tokens=8, ignore_eos=True
            )
            tail = [c async for c in client.stream(request_id, 3)]
            check_chunk_sequence(tail, start=3)
            assert tuple(joined(tail)[0]) == expected[1][3:]

            long_id = await client.submit(prompt="x", max_new_tokens=LONG, ignore_eos=True)
            async with contextlib.aclosing(client.stream(long_id)) as stream:
                await anext(stream)  # running
            assert await client.cancel(long_id) is True
            assert await client.cancel(long_id) is False
            async with contextlib.aclosing(
                client.generate("y", max_new_tokens=LONG, ignore_eos=True, request_id="e2e-left")
            ) as stream:
                await anext(stream)  # closing the generator cancels the call

            stats = await client.stats()
            assert stats.workers[0].alive and stats.total.kv_blocks_total > 0
            info = await client.model_info()
            assert info.architecture == "llama" and info.eos_token_ids == (0,)

            with pytest.raises(ShoalError) as err:
                await client.generate_text("hi", max_new_tokens=0)
            assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "max_new_tokens" in err.value.details
            with pytest.raises(ShoalError) as err:
                await client.submit("hi", max_new_tokens=0)
            assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ShoalError) as err:
                _ = [c async for c in client.stream("e2e-async-missing")]
            assert err.value.code is grpc.StatusCode.NOT_FOUND
            with pytest.raises(ShoalError) as err:
                await client.cancel("e2e-async-missing")
            assert err.value.code is grpc.StatusCode.NOT_FOUND
            with pytest.raises(ShoalError) as err:
                await client.generate_text(
                    "z", max_new_tokens=LONG, ignore_eos=True, request_id="e2e-alate", timeout=0.3
                )
            assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            for aborted in (long_id, "e2e-left", "e2e-alate"):  # all ended early on the server
                replay = [c async for c in client.stream(aborted)]
                assert replay[-1].finish_reason == "CANCELLED", aborted

        async with AsyncShoalClient(f"127.0.0.1:{free_port()}", timeout=5) as down:
            with pytest.raises(TimeoutError):
                await down.wait_ready(0.3)
            with pytest.raises(ShoalError) as err:
                await down.model_info()
            assert err.value.code is grpc.StatusCode.UNAVAILABLE

    asyncio.run(asyncio.wait_for(calls(), 60))
    wait_for(lambda: idle(shoal), message="the aborted requests freed their slots and KV")


class Counting:
    """A real AsyncShoalClient that counts the generate calls in flight."""

    def __init__(self, client: AsyncShoalClient) -> None:
        self.client = client
        self.in_flight = self.peak = 0

    async def generate(self, prompt: str | None = None, **params: Any) -> AsyncIterator[Chunk]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            async for chunk in self.client.generate(prompt, **params):
                yield chunk
        finally:
            self.in_flight -= 1


def test_run_batch_keeps_input_order_and_the_concurrency_limit(
    server: RunningServer, shoal: ShoalClient
) -> None:
    lines = [
        json.dumps({"prompt_token_ids": [i + 1, i + 2], "max_new_tokens": 6 - i % 4})
        for i in range(24)
    ]
    lines[5] = json.dumps({"prompt": "bad", "max_new_tokens": 0})
    lines[9] = "{oops"
    lines[14] = json.dumps({"prompt": "x", "top_p": 1.5, "max_new_tokens": 2})

    async def go() -> tuple[list[dict[str, Any]], int]:
        async with AsyncShoalClient(server.target, timeout=TIMEOUT) as client:
            counting = Counting(client)
            records = await run_batch(counting, parse_lines(lines), concurrency=4)
            return records, counting.peak

    records, peak = asyncio.run(asyncio.wait_for(go(), 60))
    assert [r["request_id"] for r in records] == [f"line-{i + 1}" for i in range(24)]
    assert 1 < peak <= 4
    assert count_failed(records) == 3
    assert records[5]["error"].startswith("line 6: INVALID_ARGUMENT: max_new_tokens")
    assert records[9]["error"].startswith("line 10: INVALID_ARGUMENT: ")
    assert records[14]["error"].startswith("line 15: INVALID_ARGUMENT: top_p")
    for i in (0, 7, 23):
        direct = shoal.generate_text(prompt_token_ids=[i + 1, i + 2], max_new_tokens=6 - i % 4)
        assert records[i]["token_ids"] == list(direct.token_ids)
        assert records[i]["text"] == direct.text
        assert records[i]["finish_reason"] == f"FINISH_REASON_{direct.finish_reason}"
        assert direct.usage and records[i]["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": direct.usage.completion_tokens,
            "cached_prompt_tokens": 0,  # no full KV block in 2 tokens
        }


# --- auth ------------------------------------------------------------------------------


def test_auth_token(servers: ServerGroup) -> None:
    # `servers` stops it at teardown: exit status 0, no segments left.
    locked = servers.start(*FLAGS, "--auth-token", "secret", log="auth.log")
    for token in (None, "wrong", "secret "):
        with ShoalClient(locked.target, auth_token=token, timeout=TIMEOUT) as client:
            for call in (
                client.stats,
                client.model_info,
                lambda: client.generate_text("hi", max_new_tokens=2),
                lambda: client.submit("hi", max_new_tokens=2),
                lambda: list(client.stream("any")),
                lambda: client.cancel("any"),
            ):
                with pytest.raises(ShoalError) as err:
                    call()
                assert err.value.code is grpc.StatusCode.UNAUTHENTICATED, token
                assert "secret" not in err.value.details
    with ShoalClient(locked.target, auth_token="secret", timeout=TIMEOUT) as client:
        done = client.generate_text("hi", max_new_tokens=3, ignore_eos=True)
        assert len(done.token_ids) == 3
        request_id = client.submit("hi", max_new_tokens=3, ignore_eos=True)
        assert len(joined(list(client.stream(request_id)))[0]) == 3
        assert client.stats().total.total_tokens >= 3

    async def aio() -> None:
        async with AsyncShoalClient(locked.target, auth_token="secret", timeout=10) as ok:
            assert (await ok.model_info()).architecture == "llama"
        async with AsyncShoalClient(locked.target, auth_token="nope", timeout=10) as bad:
            with pytest.raises(ShoalError) as err:
                await bad.generate_text("hi", max_new_tokens=2)
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(asyncio.wait_for(aio(), 30))

    refused = cli("--target", locked.target, "stats", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED:")
    assert "total" in cli("--target", locked.target, "--auth-token", "secret", "stats").stdout
    info = cli("info", "--json", "--target", locked.target, env={"SHOAL_AUTH_TOKEN": "secret"})
    assert json.loads(info.stdout)["vocab_size"] == 512


# --- the CLI as a subprocess ------------------------------------------------------------------


def cli(
    *argv: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "client", *argv],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
    )
    if check:
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc


def test_cli_generate_info_and_stats(server: RunningServer, shoal: ShoalClient) -> None:
    target = ("--target", server.target)
    expected = shoal.generate_text("hello", max_new_tokens=5)
    assert expected.usage
    tokens = expected.usage.completion_tokens
    summary = f"finish={expected.finish_reason} tokens={tokens} prompt_tokens="
    streamed = cli(*target, "generate", "hello", "--max-new-tokens", "5", "--stream")
    assert streamed.stdout == expected.text + "\n"
    assert summary in streamed.stderr and "ttft_ms=" in streamed.stderr
    whole = cli("generate", "hello", "--max-new-tokens", "5", *target, "--timeout", "30")
    assert whole.stdout == expected.text + "\n" and summary in whole.stderr

    ids = cli(*target, "generate", "--token-ids", "7,8,9", "--max-new-tokens", "4", "--ignore-eos")
    assert "finish=LENGTH tokens=4 prompt_tokens=3" in ids.stderr

    info = cli(*target, "info")
    lines = dict(line.split(":", 1) for line in info.stdout.splitlines())
    assert lines["architecture"].strip() == "llama" and lines["eos_token_ids"].strip() == "0"
    assert json.loads(cli(*target, "info", "--json").stdout)["max_context"] == 2048

    table = cli(*target, "stats").stdout.splitlines()
    assert table[0].split()[0] == "worker" and [r.split()[0] for r in table[1:-1]] == ["0", "total"]
    assert table[-1].startswith("pending queue (not yet on a worker): ")
    stats = json.loads(cli(*target, "stats", "--json").stdout)
    assert stats["workers"][0]["alive"] and stats["total"]["total_tokens"] > 0

    bad = cli(*target, "generate", "hello", "--max-new-tokens", "0", check=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: INVALID_ARGUMENT: max_new_tokens")
    down = cli("--target", f"127.0.0.1:{free_port()}", "--timeout", "5", "info", check=False)
    assert down.returncode == 1 and down.stderr.startswith("error: UNAVAILABLE:")
    usage = cli(*target, "generate", check=False)
    assert usage.returncode == 2 and "exactly one of a prompt or --token-ids" in usage.stderr


def test_cli_chat_keeps_the_history_and_reset_clears_it(
    server: RunningServer, shoal: ShoalClient
) -> None:
    assert shoal.model_info().has_chat_template
    flags = ("--max-new-tokens", "4", "--ignore-eos", "--system", "Be brief.")
    turns = "hello\nand again\n/reset\nthird\n"
    chat = cli("--target", server.target, "chat", *flags, stdin=turns)
    answers, summaries = chat.stdout.splitlines(), chat.stderr.splitlines()
    assert len(answers) == 3 and "(conversation cleared)" in summaries

    system = {"role": "system", "content": "Be brief."}
    history: list[dict[str, str]] = [system]
    expected = []
    for user in ("hello", "and again", None, "third"):
        if user is None:  # /reset
            history = [system]
            continue
        history.append({"role": "user", "content": user})
        done = shoal.generate_text(messages=history, max_new_tokens=4, ignore_eos=True)
        history.append({"role": "assistant", "content": done.text})
        assert done.usage
        expected.append((done.text, f"prompt_tokens={done.usage.prompt_tokens} "))
    for answer, line, (text, prompt_tokens) in zip(
        answers, [x for x in summaries if x.startswith("finish=")], expected, strict=True
    ):
        assert answer == text and prompt_tokens in line
    one_shot = cli("--target", server.target, "generate", "hello", "--chat", *flags)
    assert one_shot.stdout.splitlines()[0] == answers[0]


def test_cli_submit_stream_and_cancel(server: RunningServer, shoal: ShoalClient) -> None:
    target = ("--target", server.target)
    submit = ("submit", "--token-ids", "4,5,6", "--ignore-eos", "--temperature", "0.7")
    request_id = cli(*target, *submit, "--seed", "3", "--max-new-tokens", "9").stdout.strip()
    assert request_id
    expected = list(shoal.stream(request_id))
    text = joined(expected)[1]
    streamed = cli(*target, "stream", request_id)
    assert streamed.stdout == text + "\n"
    assert "finish=LENGTH tokens=9 prompt_tokens=3" in streamed.stderr
    assert f"request_id={request_id}" in streamed.stderr
    tail = cli(*target, "stream", request_id, "--from-index", "4").stdout
    assert tail == "".join(c.text for c in shoal.stream(request_id, from_index=4)) + "\n"
    named = cli(*target, *submit, "--max-new-tokens", "2", "--request-id", "cli-named")
    assert named.stdout == "cli-named\n"

    long_id = cli(*target, "submit", "busy", "--max-new-tokens", str(LONG), "--ignore-eos")
    long_id = long_id.stdout.strip()
    assert cli(*target, "cancel", long_id).stdout == f"cancelled {long_id}\n"
    assert cli(*target, "cancel", long_id).stdout == f"{long_id} had already finished\n"
    assert list(shoal.stream(long_id))[-1].finish_reason == "CANCELLED"
    for command in ("cancel", "stream"):
        missing = cli(*target, command, "cli-missing", check=False)
        assert missing.returncode == 1 and missing.stdout == ""
        assert missing.stderr.startswith("error: NOT_FOUND:") and "cli-missing" in missing.stderr
    wait_for(lambda: idle(shoal), message="idle after the CLI cancel")


BATCH_LINES: list[Any] = [
    {"request_id": "text", "prompt": "Hello, world", "max_new_tokens": 12, "ignore_eos": True},
    {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 9, "ignore_eos": True},
    {"request_id": "zero", "prompt": "x", "max_new_tokens": 0},
    {"prompt": "café 你好", "max_new_tokens": 10, "priority": "HIGH"},
    "{not json",
    {"prompt_token_ids": [9] * 40, "max_new_tokens": 20, "priority": 3, "ignore_eos": True},
    {"prompt": "The tide", "max_new_tokens": 16, "stop_token_ids": [277]},
    *({"prompt_token_ids": [i, i + 1], "max_new_tokens": 3 + i % 5} for i in range(1, 14)),
]


def stop_lines(shoal: ShoalClient) -> list[dict[str, Any]]:
    """Greedy requests with a stop string taken from the middle of their own completion."""
    lines = []
    for i in range(20, 40):
        fields = dict(prompt_token_ids=[i, 2 * i], max_new_tokens=24, ignore_eos=True)
        text = shoal.generate_text(**fields).text
        stop = text[len(text) // 2 :][:2]
        # U+FFFD marks bytes that are not (yet) a character: the server holds those back.
        if len(stop) == 2 and "\ufffd" not in text[: len(text) // 2 + 2]:
            lines.append({**fields, "stop": [stop]})
    assert len(lines) >= 2
    return lines[:4]


def test_cli_batch_matches_the_offline_batch_runner(
    server: RunningServer, shoal: ShoalClient, default_model: Path, tmp_path: Path
) -> None:
    lines = [*BATCH_LINES, *stop_lines(shoal)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    offline_out, client_out = tmp_path / "offline.jsonl", tmp_path / "client.jsonl"
    files = ["--input", str(src), "--output", str(offline_out)]
    options = ["--device", "cpu", "--max-batch-size", "4"]
    offline = subprocess.Popen(  # one process, no gRPC; runs alongside the client
        [sys.executable, "-m", "worker.batch", "--model", str(default_model), *files, *options],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        argv = ["--target", server.target, "batch", "--input", str(src), "--output"]
        proc = cli(*argv, str(client_out), "--concurrency", "4", check=False)
        _, offline_err = offline.communicate(timeout=90)
    finally:
        offline.kill()
    assert proc.returncode == 1, proc.stderr  # some lines were rejected
    assert f"{len(lines)} lines in" in proc.stderr and "2 failed" in proc.stderr
    assert offline.returncode == 1, offline_err
    served = [json.loads(line) for line in client_out.read_text().splitlines()]
    local = [json.loads(line) for line in offline_out.read_text().splitlines()]
    assert len(served) == len(local) == len(lines)
    assert [r["request_id"] for r in served] == [r["request_id"] for r in local]
    assert served[2] == {
        "request_id": "zero",
        "error": (
            "line 3: INVALID_ARGUMENT: max_new_tokens must be in [1, 4096] (got 0: not set, or 0)"
        ),
    }
    assert served[4]["request_id"] == "line-5"
    assert served[4]["error"].startswith("line 5: INVALID_ARGUMENT: ")
    for n, (mine, theirs) in enumerate(zip(served, local, strict=True)):
        if "error" in theirs:
            assert "error" in mine and theirs["error"].startswith(f"line {n + 1}: "), (mine, theirs)
            continue
        assert mine == theirs, n
    assert [r["finish_reason"] for r in served[len(BATCH_LINES) :]] == ["FINISH_REASON_STOP"] * (
        len(lines) - len(BATCH_LINES)
    )


# --- several servers, balanced round_robin by the client ----------------------------------


def test_round_robin_over_two_servers_survives_one_stopping(servers: ServerGroup) -> None:
    # `servers` stops both at teardown (stop() only waits for one that has already gone) and
    # checks that each exited with status 0 and left no shared-memory segment behind.
    first = servers.start(*FLAGS, log="first.log")
    second = servers.start(*FLAGS, log="second.log")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(ShoalClient(first.target, timeout=10))
        b = stack.enter_context(ShoalClient(second.target, timeout=10))
        both = stack.enter_context(ShoalClient([first.target, second.target], timeout=10))

        def tokens() -> tuple[int, int]:
            return a.stats().total.total_tokens, b.stats().total.total_tokens

        request: dict[str, Any] = dict(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
        request["ignore_eos"] = True
        both.wait_ready(10)
        results = {both.generate_text(**request).token_ids for _ in range(100)}
        assert len(results) == 1  # the same model behind both: the same greedy tokens
        wait_for(lambda: sum(tokens()) == 400, message=lambda: f"400 tokens, got {tokens()}")
        on_first, on_second = tokens()
        assert on_first >= 100 and on_second >= 100, (on_first, on_second)  # >= 25 requests each

        # A running request keeps the second server draining (up to its 30 s grace).
        busy = b.generate(prompt_token_ids=[1], max_new_tokens=LONG, ignore_eos=True)
        busy_id = next(busy).request_id
        second.process.send_signal(signal.SIGTERM)
        wait_for(lambda: second.health() == NOT_SERVING, message="second is NOT_SERVING")
        with pytest.raises(ShoalError) as err:  # new requests are turned away
            b.submit(**request)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details
        for _ in range(10):  # but the balanced client passes over the draining server
            assert both.generate_text(**request).token_ids in results
        assert second.process.poll() is None  # still draining
        assert b.cancel(busy_id) is True  # which ends the drain
        assert list(busy)[-1].finish_reason == "CANCELLED"
        assert second.stop(timeout=30) == 0, second.log.read_text()
        assert second.segments() == []

        for _ in range(10):  # and after it has gone
            assert both.generate_text(**request).token_ids in results
        wait_for(  # 10 + 10 requests
            lambda: a.stats().total.total_tokens == on_first + 80, message="80 more tokens on first"
        )

        # A new client whose first target is down gets going on the other one.
        with ShoalClient([second.target, first.target], timeout=10) as late:
            for _ in range(5):
                assert late.generate_text(**request).token_ids in results
