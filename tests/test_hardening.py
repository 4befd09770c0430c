"""Issue 10's faults as tests, each on every entry point where it applies.

1. temperature=1e-39 (and every extreme float parameter): the sampler stays exact.
2. a cancelled request's held-back text reaches live listeners as it reaches replays.
3. a 3.5 MB prompt is refused before tokenizing, and big prompts do not stall the loop.
4. bytes that are not a request message get INVALID_ARGUMENT, not UNKNOWN.
5. smaller ones: garbage bytes are not withheld, ttft_ms of a tokenless request is 0,
   request ids are escaped in the text log, retention is bounded by bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from service_harness import RunningServer, ServerGroup, free_port, run_batch, wait_for

from server.detokenizer import REPLACEMENT, IncrementalText
from server.logs import TextFormatter
from server.requests import RequestRegistry, RequestState, retained_size
from server.servicer import MAX_REQUEST_BYTES, chunk_to_proto
from server.validation import InvalidRequest, Limits, RequestFields, ValidatedRequest, validate
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc
from worker.channel.types import FinishReason, Priority, SamplingParams
from worker.sampling import filtered_probs, sample, sample_from

pytestmark = pytest.mark.timeout(240)

BIG_PROMPT = "x" * 3_500_000  # issue 10, fault 3
GREEDY = {"prompt": "Hello", "max_new_tokens": 12, "ignore_eos": True}


# -- 1. the sampler over the whole accepted range -----------------------------------------
def _logits(rows: int = 4, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 4, (rows, vocab)).astype(np.float32)


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-6])
def test_tiny_temperatures_give_the_greedy_tokens(temperature: float) -> None:
    logits = _logits()
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(4)]
    chosen = sample(np, logits, params, [0, 1, 2, 3])
    assert chosen.tolist() == logits.argmax(axis=-1).tolist()


@pytest.mark.parametrize("top_p", [0.0, 1e-38, 1e-45, 0.5, 1 - 1e-7, 1.0])
@pytest.mark.parametrize("min_p", [0.0, 1e-38, 1e-45, 0.5, 1 - 1e-7, 1.0])
@pytest.mark.parametrize("temperature", [1e-5, 1.0, 3e38, 1e300])
def test_extreme_top_p_min_p_give_no_nan_and_a_kept_token(
    top_p: float, min_p: float, temperature: float
) -> None:
    logits = _logits()
    rows = logits.shape[0]
    t = np.full(rows, min(temperature, 1e30), np.float32)
    order, probs = filtered_probs(
        np,
        logits,
        t,
        np.zeros(rows, np.int64),
        np.full(rows, top_p, np.float32),
        np.full(rows, min_p, np.float32),
    )
    assert not np.isnan(probs).any()
    kept = probs > 0
    assert kept[:, 0].all()
    # The kept tokens are a prefix of the ranking.
    assert (np.cumsum(~kept, axis=-1)[kept] == 0).all()
    for u in (0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))):
        picked = sample_from(np, order, probs, np.full(rows, u, np.float32))
        for r in range(rows):
            rank = int(np.nonzero(order[r] == picked[r])[0][0])
            assert kept[r, rank], (r, rank, u)
    params = [
        SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, seed=s)
        for s in range(rows)
    ]
    assert sample(np, logits, params, list(range(rows))).shape == (rows,)


# -- 5a. bytes that can never form a character are not withheld ----------------------------
def _byte_token(tokenizer, byte: int) -> int:
    """The toy tokenizer's id of one raw byte (GPT-2's byte-to-unicode alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        char = chr(byte)
    else:
        char = chr(256 + [b for b in range(256) if b not in printable].index(byte))
    token = tokenizer.token_to_id(char)
    assert token is not None
    return token


def test_garbage_bytes_are_released_within_four_tokens(toy_tokenizer) -> None:
    text = IncrementalText(toy_tokenizer)
    garbage = _byte_token(toy_tokenizer, 0xFF)  # never part of any UTF-8 character
    sent = "".join(text.add([garbage]).text for _ in range(8))
    # Withheld for 3 tokens (they might be a character's start), then all but the last.
    assert sent == REPLACEMENT * 7
    assert sent + text.finish() == REPLACEMENT * 8


def test_a_character_split_over_three_tokens_is_still_whole(toy_tokenizer) -> None:
    text = IncrementalText(toy_tokenizer)
    euro = [_byte_token(toy_tokenizer, b) for b in "€".encode()]
    assert [text.add([t]).text for t in euro] == ["", "", "€"]


# -- 2. every listener sees the same text, whatever ends the request -----------------------
def _state(tokenizer, stop: tuple[str, ...] = ()) -> RequestState:
    request = ValidatedRequest("r", [1, 2], SamplingParams(max_new_tokens=64), Priority.NORMAL)
    return RequestState("r", 1, request, IncrementalText(tokenizer, stop))


async def _listen(state: RequestState, index: int) -> list:
    return [chunk async for chunk in state.follow(index)]


def _final(chunk) -> tuple:
    return (chunk.finish_reason, chunk.prompt_tokens, chunk.ttft_ms, chunk.total_ms)


@pytest.mark.parametrize(
    ("ending", "stop"),
    [
        (FinishReason.CANCELLED, ()),  # half a character held back
        (FinishReason.LENGTH, ()),
        (FinishReason.EOS, ()),
        (FinishReason.CANCELLED, ("ab€Q",)),  # a possible stop-string prefix held back
    ],
)
def test_held_back_text_reaches_live_listeners_as_it_reaches_replays(
    toy_tokenizer, ending: FinishReason, stop: tuple[str, ...]
) -> None:
    async def scenario() -> None:
        state = _state(toy_tokenizer, stop)
        live = asyncio.create_task(_listen(state, 0))
        await asyncio.sleep(0)
        ab = toy_tokenizer.encode("ab").ids
        for token in [*ab, *[_byte_token(toy_tokenizer, b) for b in "€".encode()[:2]]]:
            state.add_tokens([token])
            await asyncio.sleep(0)  # the live listener takes each token as it comes
        state.finish(ending)
        chunks = await live
        n = len(state.token_ids)
        replays = {i: await _listen(state, i) for i in range(n + 1)}
        text = "".join(c.text for c in chunks)
        assert text == "".join(c.text for c in replays[0]) == "ab" + REPLACEMENT
        for i, replay in replays.items():
            assert _final(replay[-1]) == _final(chunks[-1])
            expected = "".join(state.text_deltas[i:]) + state.tail
            assert "".join(c.text for c in replay) == expected
        assert replays[n][0].text == state.tail == chunks[-1].text

    asyncio.run(scenario())


# -- 5b. ttft of a request that got no token -------------------------------------------------
def test_ttft_is_zero_on_the_wire_for_a_request_with_no_token(toy_tokenizer) -> None:
    state = _state(toy_tokenizer)
    time.sleep(0.01)
    state.finish(FinishReason.CANCELLED)
    timing = chunk_to_proto(state.chunk_from(0)).timing
    assert timing.ttft_ms == 0 and timing.total_ms > 0


# -- 5c. request ids with control characters in the text log -------------------------------
def test_control_characters_in_fields_are_escaped_in_the_text_log() -> None:
    record = logging.LogRecord("shoal.requests", logging.INFO, "", 0, "request finished", (), None)
    record.fields = {"request_id": "a\x1b[2J\rb\u2028c\x7f", "worker": 0}
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "\u2028" not in line and "\x7f" not in line
    assert 'request_id="a\\u001b[2J\\rb\\u2028c\\u007f"' in line


# -- 5d. retention bounded by bytes ------------------------------------------------------------
def test_retention_is_bounded_by_bytes(toy_tokenizer) -> None:
    registry = RequestRegistry(retention_s=3600, retention_count=1000, retention_bytes=10_000)
    sizes = []
    for i in range(20):
        request = ValidatedRequest(f"r{i}", [1] * 100, SamplingParams(), Priority.NORMAL)
        state = registry.create(request, IncrementalText(toy_tokenizer))
        state.add_tokens(toy_tokenizer.encode("hello world " * 40).ids)
        state.finish(FinishReason.LENGTH)
        registry.retire(state)
        sizes.append(retained_size(state))
        assert registry.retained_bytes == sum(map(retained_size, registry.retired.values()))
        assert registry.retained_bytes <= 10_000
    assert 0 < len(registry.retired) < 20 and "r19" in registry.retired
    assert sizes[0] > 4 * 100 + len("hello world " * 40)  # prompt tokens and text counted


# -- 3. the prompt's byte bound, before tokenizing ----------------------------------------------
class CountingPrompts:
    def __init__(self) -> None:
        self.calls = 0

    def encode_text(self, text: str) -> list[int]:
        self.calls += 1
        return [1] * len(text)

    def encode_chat(self, messages) -> list[int]:
        self.calls += 1
        return [1]


def test_the_byte_bound_is_checked_before_tokenizing() -> None:
    limits = Limits(vocab_size=512, max_context=2048, max_new_tokens_limit=64)
    prompts = CountingPrompts()
    for fields in (
        RequestFields(prompt=BIG_PROMPT, max_new_tokens=1),
        RequestFields(prompt="é" * (limits.max_prompt_bytes // 2 + 1), max_new_tokens=1),
        RequestFields(
            messages=[{"role": "user", "content": BIG_PROMPT[:600_000]}] * 2, max_new_tokens=1
        ),
    ):
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match=r"at most 1048576 are allowed \(max_prompt"):
            validate(fields, limits, prompts)
        assert time.monotonic() - started < 1
    assert prompts.calls == 0


# -- on a real server: gRPC, HTTP ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    return module_servers.start(
        *("--workers", "1", "--max-batch-size", "8", "--kv-cache-mb", "16"),
        *("--http-port", str(free_port()), "--batch-timeout-ms", "0"),
        log="hardening.log",
    )


def _generate(server: RunningServer, **fields) -> tuple[list[int], str]:
    with server.channel() as channel:
        chunks = list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(**fields)))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_grpc_tiny_temperature_is_greedy(server: RunningServer) -> None:
    greedy = _generate(server, **GREEDY)
    for temperature in (1e-39, 1e-30):
        assert _generate(server, **GREEDY, temperature=temperature, seed=7) == greedy


def test_http_tiny_temperature_is_greedy_and_a_big_prompt_is_refused(
    server: RunningServer,
) -> None:
    def complete(**body):
        body = {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True, **body}
        return httpx.post(f"{server.http}/v1/completions", json=body, timeout=60)

    greedy = complete(temperature=0).json()["choices"][0]["text"]
    for temperature in (1e-39, 1e-30, 1e-300):
        assert complete(temperature=temperature, seed=3).json()["choices"][0]["text"] == greedy
    started = time.monotonic()
    answer = complete(prompt=BIG_PROMPT)
    assert answer.status_code == 400, answer.text
    assert "max_prompt_bytes" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "prompt"
    assert time.monotonic() - started < 10
    chat = httpx.post(
        f"{server.http}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": BIG_PROMPT}], "max_tokens": 2},
        timeout=60,
    )
    assert chat.status_code == 400 and "max_prompt_bytes" in chat.text, chat.text


def test_a_live_stream_of_a_cancelled_request_gets_the_held_back_text(
    server: RunningServer,
) -> None:
    """The issue's input: Submit "Hello", ignore_eos, a long max_new_tokens, Stream, Cancel."""
    with server.channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        for attempt in range(3):
            request_id = f"held-back-{attempt}"
            stub.Submit(
                pb.GenerateRequest(
                    request_id=request_id, prompt="Hello", max_new_tokens=2000, ignore_eos=True
                )
            )
            live, cancelled = [], False
            for chunk in stub.Stream(pb.StreamRequest(request_id=request_id), timeout=60):
                live.append(chunk)
                if not cancelled and sum(len(c.token_ids) for c in live) >= 10:
                    cancelled = stub.Cancel(pb.CancelRequest(request_id=request_id)).cancelled
            assert live[-1].finish_reason == pb.FINISH_REASON_CANCELLED
            text = "".join(c.text for c in live)
            replay = list(stub.Stream(pb.StreamRequest(request_id=request_id)))
            assert "".join(c.text for c in replay) == text
            assert replay[-1].usage == live[-1].usage and replay[-1].timing == live[-1].timing
            for start in {c.index for c in live}:
                from_mid = list(
                    stub.Stream(pb.StreamRequest(request_id=request_id, from_index=start))
                )
                expected = "".join(c.text for c in live if c.index >= start)
                assert "".join(c.text for c in from_mid) == expected, start
            if text.endswith(REPLACEMENT) or live[-1].text:
                return  # held-back text was there, and every listener saw it
    pytest.skip("no text was held back at the cancel in 3 tries")


# -- 4. bytes that are not a request message ---------------------------------------------------
def _raw(server: RunningServer, rpc: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    with server.channel() as channel:
        method = f"/shoal.v1.Inference/{rpc}"
        streaming = rpc in ("Generate", "Stream")
        call = channel.unary_stream(method) if streaming else channel.unary_unary(method)
        try:
            answer = call(data, timeout=30)
            list(answer) if streaming else None
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details()


@pytest.mark.parametrize(
    ("rpc", "data"),
    [
        ("Submit", bytes.fromhex("1202fffe2004")),  # the input: prompt = b"\xff\xfe"
        ("Generate", bytes.fromhex("1202fffe2004")),
        ("Stream", bytes.fromhex("0a02fffe")),
        ("Cancel", bytes.fromhex("0a02fffe")),
        ("Submit", b"\xff\xff\xff\xff"),  # not protobuf at all
        ("Generate", b"\x0a\x80"),
        ("Stream", b"\xff\xff\xff\xff"),
        ("Cancel", b"\x08"),
    ],
)
def test_undecodable_requests_get_invalid_argument_and_one_log_line(
    server: RunningServer, rpc: str, data: bytes
) -> None:
    before = len(server.log.read_text())
    code, details = _raw(server, rpc, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid shoal.v1." in details
    time.sleep(0.2)
    new = server.log.read_text()[before:]
    assert "Traceback" not in new and len(new.splitlines()) <= 1, new


def test_an_oversized_message_gets_invalid_argument_naming_the_limit(
    server: RunningServer,
) -> None:
    big = pb.GenerateRequest(prompt="x" * (5 << 20), max_new_tokens=1).SerializeToString()
    code, details = _raw(server, "Submit", big)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert str(MAX_REQUEST_BYTES) in details


def test_a_big_prompt_is_refused_quickly_and_does_not_freeze_other_streams(
    server: RunningServer,
) -> None:
    gaps: list[float] = []
    streaming = threading.Event()

    def stream() -> None:
        with server.channel() as channel:
            request = pb.GenerateRequest(prompt="Hi", max_new_tokens=400, ignore_eos=True)
            last = None
            for _ in pb_grpc.InferenceStub(channel).Generate(request, timeout=120):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                streaming.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for(streaming.is_set, 60, "the concurrent stream started")
        with server.channel() as channel:
            stub = pb_grpc.InferenceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Submit(pb.GenerateRequest(prompt=BIG_PROMPT, max_new_tokens=1))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_prompt_bytes" in refused.value.details()
            assert "1048576" in refused.value.details()
            assert time.monotonic() - started < 5
            # Allowed by the byte bound, too long in tokens: tokenized off the loop.
            with pytest.raises(grpc.RpcError) as too_long:
                stub.Submit(pb.GenerateRequest(prompt="Hello wörld " * 80_000, max_new_tokens=1))
            assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "context" in too_long.value.details()
    finally:
        thread.join(timeout=120)
    assert gaps and max(gaps) < 1.5, max(gaps)


# -- the offline runner -----------------------------------------------------------------------
def test_offline_runner_tiny_temperature_and_big_prompt(default_model: Path, tmp_path) -> None:
    lines = [
        {**GREEDY, "request_id": "greedy"},
        {**GREEDY, "request_id": "t39", "temperature": 1e-39, "seed": "5"},
        {**GREEDY, "request_id": "t30", "temperature": 1e-30},
        json.dumps({"request_id": "big", "prompt": BIG_PROMPT, "max_new_tokens": 1}),
        {**GREEDY, "request_id": "after"},
    ]
    proc, out = run_batch(default_model, tmp_path, lines)
    by_id = {r["request_id"]: r for r in out}
    assert proc.returncode == 1, proc.stderr
    assert by_id["t39"]["token_ids"] == by_id["greedy"]["token_ids"]
    assert by_id["t30"]["token_ids"] == by_id["greedy"]["token_ids"]
    assert by_id["after"]["token_ids"] == by_id["greedy"]["token_ids"]
    assert "max_prompt_bytes" in by_id["big"]["error"] and "line 4" in by_id["big"]["error"]
