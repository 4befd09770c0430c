"""The OpenAI-compatible HTTP API of a real server (`python -m server --http-port`) over loopback.

- the official `openai` SDK against it: models, completions in every prompt form, chat with and
  without streaming, `n` with seeds, `stream_options.include_usage`, `max_completion_tokens`,
  `stop`, AsyncOpenAI, and a client that goes away (stream closed, or a request timed out)
  cancelling its request on the server;
- greedy answers equal gRPC's for the same prompt, and the in-process engine's while gRPC and
  HTTP requests run at the same time on one server;
- the raw wire: server-sent events framing, and OpenAI error objects for 400 / 401 / 404 / 429 /
  503 (and the SDK's matching exception classes);
- `shoal_http_requests_total` on the metrics port;
- the real default model (SmolLM2) answering a question through the SDK.

Most tests use the random `default_model`; servers are stopped at teardown and must exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from gguf_model import smollm2_gguf_fixture  # noqa: F401  (the `smollm2_gguf` fixture)
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from service_harness import SERVING, RunningServer, ServerGroup, free_port, wait_for

from shoal.v1 import inference_pb2 as pb
from worker.batch_processor import Request, run_to_completion
from worker.channel.types import SamplingParams

pytestmark = pytest.mark.timeout(180)

IGNORE_EOS = {"ignore_eos": True}  # shoal's extra field: exact lengths on the random model
HELLO = [{"role": "user", "content": "Hello there"}]
ERROR_KEYS = {"message", "type", "param", "code"}


# -- servers and clients ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(module_servers: ServerGroup) -> tuple[RunningServer, int]:
    """One server for most tests here: 2 workers, HTTP API and metrics on free ports."""
    metrics_port = free_port()
    server = module_servers.start(
        *("--workers", "2", "--max-batch-size", "8", "--kv-cache-mb", "16"),
        *("--http-port", str(free_port()), "--metrics-port", str(metrics_port)),
    )
    return server, metrics_port


@pytest.fixture(scope="module")
def server(served: tuple[RunningServer, int]) -> RunningServer:
    return served[0]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    return sdk(server)


@pytest.fixture(scope="module")
def model_id(client: OpenAI) -> str:
    return client.models.list().data[0].id


def sdk(server: RunningServer, key: str = "x") -> OpenAI:
    # No retries: the SDK would retry a 429 or 503 after a back-off; the tests want the answer.
    return OpenAI(base_url=server.http + "/v1", api_key=key, max_retries=0, timeout=60)


def grpc_generate(server: RunningServer, **fields: Any) -> tuple[list[int], str, pb.Usage]:
    chunks = list(server.stub().Generate(pb.GenerateRequest(**fields), timeout=60))
    tokens = [t for c in chunks for t in c.token_ids]
    return tokens, "".join(c.text for c in chunks), chunks[-1].usage


def running(server: RunningServer) -> int:
    return server.stub().GetStats(pb.GetStatsRequest(), timeout=10).total.active_sequences


def assert_error(reply: httpx.Response, status: int, param: str | None = None) -> dict:
    """An OpenAI error object: exactly {"error": {message, type, param, code}}."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["param"] == param, body
    return error


# -- the openai SDK ----------------------------------------------------------------------------
def test_models_list_and_retrieve(client: OpenAI, default_model) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [default_model.name]  # the checkpoint directory's name
    assert models[0].object == "model" and models[0].owned_by == "shoal"
    assert client.models.retrieve(default_model.name).id == default_model.name
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.status_code == 404 and err.value.param == "model"


def test_completions_take_every_prompt_form(client: OpenAI, model_id: str) -> None:
    def create(prompt: Any, n: int = 1, temperature: float = 0) -> Any:
        return client.completions.create(
            model=model_id,
            prompt=prompt,
            max_tokens=3,
            n=n,
            seed=1,
            temperature=temperature,
            extra_body=IGNORE_EOS,
        )

    def texts(reply: Any) -> list[str]:
        return [c.text for c in reply.choices]

    one = create("The sea")
    assert one.object == "text_completion" and len(one.choices) == 1
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 3
    several = create(["The sea", "The sky", "A ship"])
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.usage.completion_tokens == 9
    # Choice i answers prompt i.
    assert texts(several) == [texts(create(p))[0] for p in ("The sea", "The sky", "A ship")]
    ids = create([5, 6, 7, 8])
    assert len(ids.choices) == 1 and ids.usage.prompt_tokens == 4
    lists = create([[5, 6], [7, 8, 9]])
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == 5
    assert texts(lists) == texts(create([5, 6])) + texts(create([7, 8, 9]))
    # n choices per prompt: prompt i's choices are i*n .. i*n+n-1; each prompt counted once.
    both = create([[5, 6], [7, 8, 9]], n=2, temperature=1)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.usage.prompt_tokens == 5 and both.usage.completion_tokens == 12
    assert both.usage.total_tokens == 17


def test_greedy_http_answers_equal_grpc(client: OpenAI, server: RunningServer, model_id) -> None:
    prompt = "Once upon a time, in a quiet harbour"
    _, text, usage = grpc_generate(server, prompt=prompt, max_new_tokens=24, ignore_eos=True)
    reply = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=24, temperature=0, extra_body=IGNORE_EOS
    )
    assert reply.choices[0].text == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    # Chat: the same conversation through gRPC's `messages` (the same chat template).
    _, chat_text, chat_usage = grpc_generate(
        server, messages=[pb.ChatMessage(**m) for m in HELLO], max_new_tokens=16, ignore_eos=True
    )
    chat = client.chat.completions.create(
        model=model_id, messages=HELLO, max_tokens=16, temperature=0, extra_body=IGNORE_EOS
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_text
    assert chat.usage.prompt_tokens == chat_usage.prompt_tokens
    assert chat.usage.completion_tokens == 16


def test_chat_content_as_parts_and_streaming_give_the_same_answer(
    client: OpenAI, model_id: str
) -> None:
    common = dict(model=model_id, max_tokens=20, temperature=0, extra_body=IGNORE_EOS)
    plain = client.chat.completions.create(messages=HELLO, **common)
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    as_parts = client.chat.completions.create(
        messages=[{"role": "user", "content": parts}], **common
    )
    answer = plain.choices[0].message.content
    assert as_parts.choices[0].message.content == answer
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(messages=HELLO, stream=True, **common))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stream_options_include_usage_ends_with_a_usage_chunk(
    client: OpenAI, model_id: str
) -> None:
    common = dict(model=model_id, max_tokens=7, temperature=0, extra_body=IGNORE_EOS)
    plain = client.chat.completions.create(messages=HELLO, **common)
    chunks = list(
        client.chat.completions.create(
            messages=HELLO, stream=True, stream_options={"include_usage": True}, **common
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert last.usage.completion_tokens == 7
    assert all(c.choices for c in chunks[:-1])
    # The completions stream too.
    stream = client.completions.create(
        prompt="abc", stream=True, stream_options={"include_usage": True}, **common
    )
    *text_chunks, usage_chunk = list(stream)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 7
    assert text_chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_are_seeded_per_choice(client: OpenAI, model_id: str) -> None:
    def ask(n: int, seed: int) -> list[str]:
        reply = client.chat.completions.create(
            model=model_id, messages=HELLO, n=n, seed=seed, max_tokens=16, extra_body=IGNORE_EOS
        )
        assert [c.index for c in reply.choices] == list(range(n))
        assert reply.usage.completion_tokens == 16 * n
        return [c.message.content for c in reply.choices]

    first = ask(2, seed=1234)
    assert len(first) == 2 and first[0] != first[1]
    assert ask(2, seed=1234) == first  # the same call, the same two answers
    # Choice i draws with seed + i.
    assert ask(1, seed=1234) == first[:1]
    assert ask(1, seed=1235) == first[1:]
    # Streamed: the same two answers, interleaved by index.
    chunks = client.chat.completions.create(
        model=model_id,
        messages=HELLO,
        n=2,
        seed=1234,
        max_tokens=16,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == first


def test_async_client_streams_concurrently(server: RunningServer, model_id: str) -> None:
    seeds = [11, 12, 13, 14]
    common = dict(model=model_id, max_tokens=12, temperature=0.8, extra_body=IGNORE_EOS)
    sync = sdk(server)
    expected = [
        sync.chat.completions.create(messages=HELLO, seed=s, **common).choices[0].message.content
        for s in seeds
    ]

    async def main() -> list[str]:
        async with AsyncOpenAI(base_url=server.http + "/v1", api_key="x", max_retries=0) as aio:

            async def one(seed: int) -> str:
                stream = await aio.chat.completions.create(
                    messages=HELLO, seed=seed, stream=True, **common
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            return await asyncio.gather(*(one(s) for s in seeds))

    assert asyncio.run(main()) == expected


def test_max_completion_tokens_and_stop(client: OpenAI, model_id: str) -> None:
    chat = client.chat.completions.create(
        model=model_id, messages=HELLO, max_completion_tokens=9, extra_body=IGNORE_EOS
    )
    assert chat.usage.completion_tokens == 9 and chat.choices[0].finish_reason == "length"
    # max_completion_tokens wins over max_tokens, as in OpenAI's API.
    both = client.chat.completions.create(
        model=model_id,
        messages=HELLO,
        max_completion_tokens=3,
        max_tokens=30,
        extra_body=IGNORE_EOS,
    )
    assert both.usage.completion_tokens == 3

    common = dict(model=model_id, max_tokens=40, temperature=0, extra_body=IGNORE_EOS)
    full = client.completions.create(prompt="Tides and stars", **common).choices[0].text
    clean = [i for i in range(10, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, full
    stop = full[clean[0] : clean[0] + 2]
    cut = full[: full.find(stop)]
    one = client.completions.create(prompt="Tides and stars", stop=stop, **common).choices[0]
    assert (one.text, one.finish_reason) == (cut, "stop")
    listed = client.completions.create(
        prompt="Tides and stars", stop=["\x00never\x00", stop], **common
    ).choices[0]
    assert (listed.text, listed.finish_reason) == (cut, "stop")


def test_closing_a_stream_cancels_the_request(client: OpenAI, server: RunningServer, model_id):
    stream = client.chat.completions.create(
        model=model_id, messages=HELLO, max_tokens=1800, stream=True, extra_body=IGNORE_EOS
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    assert running(server) == 1
    stream.close()
    wait_for(lambda: running(server) == 0, 3, "no running sequence after the client closed")
    assert httpx.get(server.http + "/stats", timeout=10).json()["running"] == 0


def test_a_client_timing_out_cancels_its_request(server: RunningServer, model_id: str) -> None:
    body = {"model": model_id, "prompt": "long", "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.http + "/v1/completions", json=body, timeout=1.0)
    wait_for(lambda: running(server) == 0, 3, "no running sequence after the client left")


# -- gRPC and HTTP together ----------------------------------------------------------------
def test_grpc_and_http_at_once_equal_the_in_process_engine(
    server: RunningServer, client: OpenAI, model_id: str, make_processor, model_tokenizer
) -> None:
    """Both edges feed one queue and the same workers: greedy tokens are the engine's."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 512, size=int(n)).tolist() for n in rng.integers(1, 50, size=24)]
    lengths = [int(n) for n in rng.integers(1, 20, size=24)]

    def over_grpc(prompt: list[int], n: int) -> tuple[list[int], str, int]:
        tokens, text, usage = grpc_generate(
            server, prompt_token_ids=prompt, max_new_tokens=n, ignore_eos=True
        )
        return tokens, text, usage.prompt_tokens

    def over_http(prompt: list[int], n: int) -> tuple[None, str, int]:
        reply = client.completions.create(
            model=model_id, prompt=prompt, max_tokens=n, temperature=0, extra_body=IGNORE_EOS
        )
        assert reply.usage.completion_tokens == n
        return None, reply.choices[0].text, reply.usage.prompt_tokens

    with ThreadPoolExecutor(24) as pool:
        futures = [
            pool.submit(over_http if i % 2 else over_grpc, p, n)
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        served = [f.result() for f in futures]
    requests = [
        Request(str(i), p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    local = run_to_completion(make_processor(max_batch_size=8), requests)
    for i, (tokens, text, prompt_tokens) in enumerate(served):
        expected = local[str(i)].token_ids
        assert prompt_tokens == len(prompts[i])
        if tokens is not None:  # gRPC: the token ids themselves
            assert tokens == expected, i
        assert text == model_tokenizer.decode(expected), i  # both edges: the same text


# -- the raw wire: SSE framing and error objects ------------------------------------------------
def sse_events(reply: httpx.Response) -> list[str]:
    """Every event's data; the framing checked: `data: ...` then a blank line, nothing else."""
    raw = reply.read().decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[: -len("\n\n")].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return [e[len("data: ") :] for e in events]


def test_completions_logprobs_through_the_sdk(
    client: OpenAI, server: RunningServer, model_id: str
) -> None:
    """Legacy `logprobs: n`: tokens, token_logprobs, top_logprobs (n + the sampled one) and
    text_offset, the same streamed and not, and gRPC's values."""
    common = dict(model=model_id, prompt=[5, 6, 7, 8], max_tokens=6, temperature=0)
    whole = client.completions.create(**common, logprobs=3, extra_body=IGNORE_EOS).choices[0]
    lp = whole.logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 6
    offsets = [0]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == value  # greedy: the top one
        assert value == max(top.values())
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets[:-1]
    chunks = client.completions.create(**common, logprobs=3, stream=True, extra_body=IGNORE_EOS)
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # continued per chunk
    assert client.completions.create(**common).choices[0].logprobs is None
    grpc = server.stub().Generate(
        pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_new_tokens=6, ignore_eos=True,
                           logprobs=True, top_logprobs=3),
        timeout=60,
    )  # fmt: skip
    values = [e.logprob for c in grpc for e in c.logprobs]
    np.testing.assert_allclose(lp.token_logprobs, values, rtol=0, atol=1e-5)


def test_chat_logprobs_through_the_sdk(client: OpenAI, model_id: str) -> None:
    """`logprobs: true` + `top_logprobs`: choices[].logprobs.content, one entry per token,
    the same streamed and not; without top_logprobs the alternatives are empty."""
    common = dict(model=model_id, messages=HELLO, max_tokens=7, temperature=0)
    answer = client.chat.completions.create(
        **common, logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 7
    for entry in content:
        assert isinstance(entry.token, str) and entry.bytes is not None
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
    stream = client.chat.completions.create(
        **common, logprobs=True, top_logprobs=2, stream=True, extra_body=IGNORE_EOS,
        stream_options={"include_usage": True},
    )  # fmt: skip
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    bare = client.chat.completions.create(**common, logprobs=True, extra_body=IGNORE_EOS)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert [e.logprob for e in bare.choices[0].logprobs.content] == [e.logprob for e in content]
    assert client.chat.completions.create(**common).choices[0].logprobs is None


def test_penalties_through_the_sdk_are_the_engines(
    client: OpenAI, model_id: str, make_processor, model_tokenizer
) -> None:
    penalties = dict(frequency_penalty=1.5, presence_penalty=0.5)
    body = dict(model=model_id, prompt=[9, 9, 9], max_tokens=10, temperature=0)
    extra = {**IGNORE_EOS, "repetition_penalty": 1.3}  # shoal's extra field
    text = client.completions.create(**body, **penalties, extra_body=extra).choices[0].text
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=1.3, **penalties)
    want = run_to_completion(make_processor(), [Request("p", [9, 9, 9], params)])["p"]
    assert text == model_tokenizer.decode(want.token_ids)
    plain = client.completions.create(**body, extra_body=IGNORE_EOS).choices[0].text
    assert text != plain  # the penalties mattered


def test_sse_framing_of_both_streams(server: RunningServer, model_id: str) -> None:
    bodies = {
        "/v1/completions": {"prompt": ["a", "b"], "max_tokens": 4},
        "/v1/chat/completions": {"messages": HELLO, "max_tokens": 4, "n": 2},
    }
    for route, body in bodies.items():
        body = {**body, "model": model_id, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.http + route, json=body, timeout=60) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = sse_events(reply)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        ends = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert sorted(ch["index"] for ch in ends) == [0, 1]  # each choice ends once
        assert {ch["finish_reason"] for ch in ends} == {"length"}
        if route == "/v1/chat/completions":
            first = chunks[0]["choices"]
            assert [c["delta"]["role"] for c in first] == ["assistant", "assistant"]
            assert all("role" not in ch["delta"] for c in chunks[1:] for ch in c["choices"])
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        else:
            assert {c["object"] for c in chunks} == {"text_completion"}
            assert all(isinstance(ch["text"], str) for c in chunks for ch in c["choices"])


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BAD_REQUESTS = [  # (route, body, the param the error names, words in its message)
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 10**30}, "max_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, "temperature", "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    (COMPLETIONS, {"prompt": "x", "top_p": 2}, "top_p", "top_p"),
    (COMPLETIONS, {"prompt": "x", "min_p": 2}, "min_p", "min_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n", "n"),
    (COMPLETIONS, {"prompt": "x", "n": 17}, "n", "n"),
    (COMPLETIONS, {"prompt": "x", "seed": -1}, "seed", "seed"),
    (COMPLETIONS, {"prompt": "x", "top_k": -5}, "top_k", "top_k"),
    (COMPLETIONS, {"prompt": "x", "priority": "URGENT"}, "priority", "priority"),
    (COMPLETIONS, {"prompt": "x", "stop": ["a"] * 17}, "stop", "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop[0]", "string"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
    (COMPLETIONS, {"prompt": "x", "logprobs": -1}, "logprobs", "logprobs must be in [0, 20]"),
    (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": -1}, "repetition_penalty", "[0.01, 100]"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 101}, "repetition_penalty", "100"),
    (COMPLETIONS, {"prompt": "x", "echo": True}, "echo", "not supported"),
    (
        COMPLETIONS,
        {"prompt": "x", "stream_options": {"include_usage": 1}},
        "stream_options.include_usage",
        "boolean",
    ),
    (COMPLETIONS, {"prompt": ["text", [1, 2]]}, "prompt[1]", "accepted forms"),  # both kinds
    (COMPLETIONS, {"prompt": [1, "text"]}, "prompt[0]", "accepted forms"),
    (COMPLETIONS, {"prompt": ""}, "prompt", "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt", "empty"),
    (COMPLETIONS, {"prompt": [[1], []]}, "prompt", "prompt[1]"),
    (COMPLETIONS, {"prompt": [1, 512]}, "prompt", "vocab"),
    (COMPLETIONS, {"prompt": [1] * 2040, "max_tokens": 20}, "prompt", "context"),
    (COMPLETIONS, {"prompt": "\ud800"}, "prompt", "surrogate"),
    (COMPLETIONS, {"max_tokens": 3}, "prompt", "required"),
    (CHAT, {"messages": HELLO, "top_logprobs": 2}, "top_logprobs", "needs logprobs to be true"),
    (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    (CHAT, {"messages": HELLO, "logprobs": 1}, "logprobs", "boolean"),
    (CHAT, {"messages": HELLO, "presence_penalty": -2.5}, "presence_penalty", "[-2, 2]"),
    (CHAT, {"messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens", "[1,"),
    (CHAT, {"messages": HELLO, "max_tokens": -3}, "max_tokens", "max_tokens"),
    (CHAT, {"messages": []}, "messages", "empty"),
    (CHAT, {"messages": "hi"}, "messages", "list"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    (CHAT, {"messages": [{"role": "", "content": "x"}]}, "messages", "role"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages[0].role", "required"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
        "text",
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    BAD_REQUESTS,
    ids=[
        f"{'chat' if r == CHAT else 'text'}-{p}-{i}" for i, (r, _, p, _) in enumerate(BAD_REQUESTS)
    ],
)
def test_bad_requests_are_400_naming_the_field(
    server: RunningServer, route: str, body: dict, param: str, words: str
) -> None:
    # json.dumps escapes what is not ASCII: a lone surrogate travels as `\ud800`, as JSON allows.
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    reply = httpx.post(server.http + route, content=raw, headers=headers, timeout=30)
    error = assert_error(reply, 400, param)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error


def test_unreadable_bodies_are_400(server: RunningServer) -> None:
    url = server.http + COMPLETIONS
    headers = {"content-type": "application/json"}
    for raw in (b'{"prompt": "x",', b"\xff\xfe", b"[1, 2]", b'"text"', b"", b"[" * 100000):
        error = assert_error(httpx.post(url, content=raw, headers=headers, timeout=30), 400)
        assert error["type"] == "invalid_request_error", raw[:20]
    error = assert_error(httpx.post(url, content=b'{"prompt": "x",', headers=headers), 400)
    assert "JSON" in error["message"]


def test_unknown_fields_are_ignored_and_null_means_the_default(
    server: RunningServer, model_id: str
) -> None:
    extra = {"user": "me", "logit_bias": {}, "tools": [{"junk": [1, {"a": None}]}], "x": 1e300}
    nulls = {"temperature": None, "top_p": None, "stop": None, "n": None, "seed": None}
    for route, body in (
        (COMPLETIONS, {"prompt": "x", "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "user", "content": "x", "name": "me"}], "max_tokens": 2}),
    ):
        reply = httpx.post(server.http + route, json={**body, **extra, **nulls}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["choices"]) == 1


def test_unknown_model_and_route_are_404(server: RunningServer) -> None:
    for route, body in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": HELLO})):
        reply = httpx.post(server.http + route, json={**body, "model": "gpt-5"}, timeout=30)
        assert assert_error(reply, 404, "model")["code"] == "model_not_found"
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/nope"), ("GET", "/nope.html")):
        reply = httpx.request(method, server.http + path, json={}, timeout=30)
        assert assert_error(reply, 404)["type"] == "not_found_error"


def test_the_sdk_raises_its_own_classes_for_400_and_404(client: OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_id, messages=HELLO, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_id, messages=HELLO, frequency_penalty=2.5)
    assert bad.value.param == "frequency_penalty" and "[-2, 2]" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-5", prompt="x")
    assert missing.value.code == "model_not_found"


# -- metrics ------------------------------------------------------------------------------------
def http_counts(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.labels["route"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "shoal_http_requests_total"
    }


def test_http_requests_are_counted_by_route_and_code(
    served: tuple[RunningServer, int], client: OpenAI, model_id: str
) -> None:
    server, port = served
    before = http_counts(port)
    for _ in range(3):
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=2)
    list(client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=2, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=HELLO, top_p=2)
    client.models.list()
    httpx.get(server.http + "/v1/nope", timeout=10)

    def delta(route: str, code: str) -> float:
        return http_counts(port).get((route, code), 0) - before.get((route, code), 0)

    assert delta(CHAT, "200") == 4
    assert delta(CHAT, "400") == 1
    assert delta("/v1/models", "200") == 1
    assert delta("/v1/{path:path}", "404") == 1


# -- servers of their own: auth, a tiny queue, draining ---------------------------------------
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def tight(module_servers: ServerGroup) -> RunningServer:
    """Bearer auth, one slot, a pending queue of one; a worker's death fails its requests."""
    return module_servers.start(
        *("--workers", "1", "--max-batch-size", "1", "--max-queue-len", "1"),
        *("--max-resumptions", "1"),
        *("--batch-timeout-ms", "0", "--auth-token", TOKEN, "--http-port", str(free_port())),
        log="tight.log",
    )


def test_bearer_token_is_required_except_for_health(tight: RunningServer) -> None:
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}):
        reply = httpx.post(tight.http + COMPLETIONS, json=body, headers=headers, timeout=30)
        assert assert_error(reply, 401)["type"] == "invalid_request_error"
        assert_error(httpx.get(tight.http + "/v1/models", headers=headers, timeout=30), 401)
        assert_error(httpx.get(tight.http + "/stats", headers=headers, timeout=30), 401)
    assert httpx.get(tight.http + "/health", timeout=30).json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(tight, key="wrong").models.list()
    assert err.value.status_code == 401
    good = sdk(tight, key=TOKEN)
    model = good.models.list().data[0].id
    reply = good.completions.create(model=model, prompt="x", max_tokens=2, extra_body=IGNORE_EOS)
    assert reply.usage.completion_tokens == 2


def test_a_full_queue_is_429_for_both_edges(tight: RunningServer) -> None:
    """One request runs, one waits (gRPC's, in the shared queue); the next is refused."""
    good = sdk(tight, key=TOKEN)
    model = good.models.list().data[0].id
    stub = tight.stub()
    long = {"prompt": "busy", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=tight.http, headers=headers, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json={**long, "model": model}) as busy:
            assert busy.status_code == 200
            # Keep the iterator: once collected, httpx closes the response (and the server
            # cancels the request).
            lines = busy.iter_lines()
            next(lines)  # the only slot is taken
            queued = stub.Submit(
                pb.GenerateRequest(prompt="wait", max_new_tokens=5), metadata=AUTH, timeout=10
            ).request_id
            refused = [http.post(COMPLETIONS, json={**long, "stream": s}) for s in (True, False)]
            for reply in refused:
                assert assert_error(reply, 429)["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError) as err:
                good.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
            assert err.value.status_code == 429
            with pytest.raises(grpc.RpcError) as full:
                more = pb.GenerateRequest(prompt="more", max_new_tokens=2)
                stub.Submit(more, metadata=AUTH, timeout=10)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # n choices take n places: all or none of them are queued.
            stub.Cancel(pb.CancelRequest(request_id=queued), metadata=AUTH, timeout=10)
            reply = http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "n": 2})
            assert_error(reply, 429)
            assert stub.GetStats(pb.GetStatsRequest(), metadata=AUTH).pending_queue_length == 0
        # The stream closed: its slot is free again.
        wait_for(
            lambda: stub.GetStats(pb.GetStatsRequest(), metadata=AUTH).total.active_sequences == 0,
            3,
            "the closed stream's slot freed",
        )
        reply = http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "n": 1})
        assert reply.status_code == 200, reply.text


def test_a_worker_dying_mid_stream_ends_it_with_an_error_event(tight: RunningServer) -> None:
    """The stream was answered 200 already: the error comes as its last event, an OpenAI error
    object (no `[DONE]`), and the server serves again once the worker is back."""
    good = sdk(tight, key=TOKEN)
    model = good.models.list().data[0].id
    headers = {"authorization": f"Bearer {TOKEN}"}
    body = {"model": model, "prompt": "doomed", "max_tokens": 1900, "ignore_eos": True}
    pids = [
        int(line.split("pid ")[1].rstrip(")"))
        for line in tight.log.read_text().splitlines()
        if "worker 0 started" in line
    ]
    url = tight.http + COMPLETIONS
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: {")  # running
        os.kill(pids[-1], signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] != "data: [DONE]"
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert set(error) == ERROR_KEYS and "worker 0 died" in error["message"], error
    assert error["type"] == "server_error"
    wait_for(lambda: tight.health() == SERVING, 60, "SERVING again once worker 0 restarted")
    reply = good.completions.create(
        model=model, prompt="after", max_tokens=3, extra_body=IGNORE_EOS
    )
    assert reply.usage.completion_tokens == 3


def test_draining_answers_503(servers: ServerGroup) -> None:
    server = servers.start(
        "--workers", "1", "--drain-grace-s", "30", "--http-port", str(free_port())
    )
    client = sdk(server)
    model = client.models.list().data[0].id
    body = {"model": model, "prompt": "finish me", "max_tokens": 1900, "ignore_eos": True}
    with httpx.stream("POST", server.http + COMPLETIONS, json={**body, "stream": True}) as long:
        lines = long.iter_lines()  # kept: collected, it would close the response
        next(lines)  # running
        server.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: httpx.get(server.http + "/health", timeout=5).status_code == 503,
            10,
            "/health says 503 once draining",
        )
        assert httpx.get(server.http + "/health", timeout=5).json() == {"status": "unavailable"}
        reply = httpx.post(server.http + COMPLETIONS, json={**body, "max_tokens": 2}, timeout=10)
        error = assert_error(reply, 503)
        assert error["type"] == "service_unavailable" and "draining" in error["message"]
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        assert isinstance(err.value, openai.APIStatusError) and err.value.status_code == 503
        assert server.process.poll() is None  # still draining: the long request runs
    # The stream closed, so the server cancelled its request: the drain ends with it.
    assert server.process.wait(timeout=30) == 0
    finished = [line for line in server.log.read_text().splitlines() if "request finished" in line]
    assert len(finished) == 1 and "finish_reason=cancelled" in finished[0], finished


# -- the real default model ----------------------------------------------------------------------
def test_the_real_model_answers_through_the_sdk(
    servers: ServerGroup,
    smollm2_gguf,
) -> None:
    server = servers.start(
        "--workers", "1", "--http-port", str(free_port()), model=smollm2_gguf, log="real.log"
    )
    client = sdk(server)
    model = client.models.list().data[0].id
    assert model == smollm2_gguf.stem
    question = [{"role": "user", "content": "What is the capital of France?"}]
    common = dict(model=model, messages=question, temperature=0, max_tokens=24)
    answer = client.chat.completions.create(**common)
    text = answer.choices[0].message.content
    assert "Paris" in text, text
    _, grpc_text, _ = grpc_generate(
        server, messages=[pb.ChatMessage(**m) for m in question], max_new_tokens=24
    )
    assert text == grpc_text
    streamed = client.chat.completions.create(**common, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    stopped = client.chat.completions.create(**common, stop=["Paris"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == text[: text.find("Paris")]
    # Logprobs: each token's bytes, joined, are the answer (the model's own vocabulary), then
    # the end-of-turn token it stopped on (generated, so listed; its text is not content).
    # Greedy: every token is the most likely one.
    scored = client.chat.completions.create(**common, logprobs=True, top_logprobs=2).choices[0]
    assert scored.message.content == text
    content = scored.logprobs.content
    assert b"".join(bytes(e.bytes) for e in content[:-1]).decode() == text
    assert content[-1].token == "<|im_end|>"
    assert "Paris" in [e.token.strip() for e in content]
    assert all(e.top_logprobs[0].token == e.token for e in content)
    assert all(e.top_logprobs[0].logprob == e.logprob <= 0 for e in content)
