"""Generated request bodies against one real server's OpenAI-compatible API (hypothesis).

Every known field of `/v1/completions` and `/v1/chat/completions` gets valid values and JSON
junk of every type (nested junk, huge integers, NaN / Infinity, strings that look like numbers,
lone surrogates, wrong shapes for `messages`, `prompt`, `stop`, `stream_options`), next to
unknown fields and bodies that are no object at all. Every answer must be a 200 (a complete
answer, or a stream ending in `data: [DONE]`) or an OpenAI error object with 400 (or 404 for
an unknown model): never a 422, never a 5xx, never a traceback in the server's log. Afterwards
the server still serves and has nothing left running.

Accepted bodies are kept cheap: lengths are forced to at most 4 tokens, `n` to at most 2, and
`stream` is mostly off.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_harness import RunningServer, ServerGroup, free_port

from shoal.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(300)

# 2 x 1000 bodies, ~20 s on 2 cores.
SETTINGS = settings(
    derandomize=True,  # the suite replays fixed examples (CI never flakes); scripts explore
    max_examples=1000,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_TOKENS = 4
REQUIRED = ("prompt", "messages")


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    flags = ("--workers", "1", "--max-batch-size", "8", "--kv-cache-mb", "16")
    return module_servers.start(*flags, "--http-port", str(free_port()), log="fuzz.log")


@pytest.fixture(scope="module")
def http(server: RunningServer) -> httpx.Client:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(http: httpx.Client) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


# -- values ------------------------------------------------------------------------------------
NUMBERS_AS_TEXT = ["NaN", "nan", "Infinity", "-inf", "1e400", "0", "-1", "true", "null"]
ODD_STRINGS = st.sampled_from(
    [*NUMBERS_AS_TEXT, "HIGH", "user", "", " ", "\x00", "\ud800", "a\udc00b", "🙂" * 3, "x" * 300]
)
# Text as JSON can carry it: lone surrogates (`\ud800` escapes) too, which st.text() never draws.
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from("ab \n\ud800\udfff\x00🙂é"), max_size=6),
    ODD_STRINGS,
)
HUGE_INTS = st.sampled_from([2**63, 2**64, 2**64 - 1, -(2**63) - 1, 10**30, -(10**30), 10**300])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 20),
    HUGE_INTS,
    st.floats(),  # NaN and ±Infinity included: JSON's non-standard literals
    TEXT,
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


PROB = st.floats(0, 1)
TOKEN_IDS = st.lists(st.integers(-2, 600), min_size=0, max_size=6)
TEXT_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXT},
    optional={"name": JUNK},
)
ODD_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", ""]) | TEXT | JUNK,
        "content": st.one_of(TEXT, st.lists(TEXT_PART | JUNK, max_size=3), st.none(), JUNK),
    },
)
# Each known field with values of its own type, edge values and out-of-range ones included.
COMMON = {
    "model": TEXT,  # the right name is put in by `finish` most of the time
    "max_tokens": st.integers(-2, 5000) | HUGE_INTS,
    "temperature": st.floats(-1, 3) | st.integers(0, 2) | st.sampled_from([math.nan, math.inf]),
    "top_p": PROB | st.floats(-1, 2),
    "top_k": st.integers(-2, 600) | HUGE_INTS,
    "min_p": PROB | st.floats(-1, 2),
    "seed": st.integers(-1, 2**64) | HUGE_INTS,
    "n": st.integers(-1, 20) | HUGE_INTS,
    "stop": TEXT | st.lists(TEXT, max_size=18),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "frequency_penalty": st.floats(-3, 3) | st.sampled_from([0, 2, math.nan, -math.inf]),
    "presence_penalty": st.floats(-3, 3) | st.sampled_from([0, -2, math.nan, math.inf]),
    "repetition_penalty": st.floats(-1, 120) | st.sampled_from([0, 1, 1.2, 0.01, math.nan]),
    "priority": st.sampled_from(["HIGH", "normal", "PRIORITY_LOW", "", 0, 1, 3, 9]) | TEXT,
    "ignore_eos": st.booleans(),
}
FIELDS = {
    "/v1/completions": {
        **COMMON,
        "prompt": st.one_of(
            TEXT, st.lists(TEXT, max_size=3), TOKEN_IDS, st.lists(TOKEN_IDS, max_size=3)
        ),
        "logprobs": st.integers(-1, 22) | HUGE_INTS,
        "echo": st.booleans(),
    },
    "/v1/chat/completions": {
        **COMMON,
        "messages": st.lists(MESSAGE, max_size=3) | st.lists(ODD_MESSAGE | JUNK, max_size=3),
        "max_completion_tokens": st.integers(-2, 5000) | HUGE_INTS,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 22) | HUGE_INTS,
    },
}


def _count(value: Any) -> bool:
    """A JSON number the server takes as a token count or `n` (not a bool, not junk)."""
    return isinstance(value, int) and not isinstance(value, bool)


@st.composite
def bodies(draw: st.DrawFn, route: str, model_id: str) -> Any:
    """A body for `route`: known fields with values of their type, 0 to 2 of them junk
    instead, unknown fields, the right model mostly; sometimes no object at all.

    Whatever the server would accept runs at most MAX_TOKENS tokens in at most 2 choices of
    at most 3 prompts, and mostly without streaming.
    """
    if draw(st.integers(0, 49)) == 0:
        return draw(JUNK)
    fields = FIELDS[route]
    body = draw(st.dictionaries(TEXT, JUNK, max_size=3))  # unknown fields
    body |= draw(st.fixed_dictionaries({}, optional=fields))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        body[name] = draw(JUNK)
    if "model" not in body or draw(st.integers(0, 9)) > 0:
        body["model"] = model_id
    if draw(st.integers(0, 9)) > 0:
        body["stream"] = False
    for key in ("max_tokens", "max_completion_tokens"):
        if _count(body.get(key)) and MAX_TOKENS < body[key] <= 4096:
            body[key] = 1 + body[key] % MAX_TOKENS
    if all(body.get(k) is None for k in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = draw(st.integers(1, MAX_TOKENS))  # not 16, or the whole context
    if _count(body.get("n")) and 2 < body["n"] <= 16:
        body["n"] = 1 + body["n"] % 2
    return body


def send(http: httpx.Client, route: str, body: Any) -> None:
    """One request; its answer must be a complete 200 or an OpenAI-style 400 / 404."""
    raw = json.dumps(body, allow_nan=True)  # ASCII: lone surrogates travel as \ud800 escapes
    reply = http.post(route, content=raw, headers={"content-type": "application/json"})
    status, text = reply.status_code, reply.text
    assert status in (200, 400, 404), (status, text[:500], raw[:500])
    if status != 200:
        error = reply.json()
        assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS, text
        assert isinstance(error["error"]["message"], str) and error["error"]["message"]
        param = error["error"]["param"]
        if status == 404:
            assert param == "model", text
        # The field named is one the body has (`messages[0].content` -> `messages`) or one
        # that it lacks but must have, or none.
        named = param and re.split(r"[.\[]", param)[0]
        assert named is None or named in body or named in REQUIRED, (text, raw[:500])
        return
    if reply.headers["content-type"].startswith("text/event-stream"):
        events = text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], (text[-500:], raw[:500])
        for event in events[:-2]:
            chunk = json.loads(event.removeprefix("data: "))
            assert "error" not in chunk, (chunk, raw[:500])
        return
    answer = reply.json()
    assert answer["choices"], (answer, raw[:500])
    usage = answer["usage"]
    assert usage["completion_tokens"] <= MAX_TOKENS * len(answer["choices"]), (answer, raw)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@SETTINGS
@given(data=st.data())
def test_generated_completion_bodies(http: httpx.Client, model_id: str, data) -> None:
    route = "/v1/completions"
    send(http, route, data.draw(bodies(route, model_id), label="body"))


@SETTINGS
@given(data=st.data())
def test_generated_chat_bodies(http: httpx.Client, model_id: str, data) -> None:
    route = "/v1/chat/completions"
    send(http, route, data.draw(bodies(route, model_id), label="body"))


def test_the_server_still_serves_after_the_fuzzing(
    server: RunningServer, http: httpx.Client, model_id: str
) -> None:
    """Runs after the two above (file order): healthy, answering, nothing left running."""
    assert http.get("/health").json() == {"status": "ok"}
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = http.post("/v1/chat/completions", json={**body, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    stats = server.stub().GetStats(pb.GetStatsRequest(), timeout=10)
    assert stats.pending_queue_length == 0 and stats.total.active_sequences == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
