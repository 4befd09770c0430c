"""Generated JSONL lines through the offline runner, `python -m worker.batch` (hypothesis).

Each example is one batch of ~30-50 lines run by one subprocess (a bigger batch overruns
hypothesis's buffer per example and takes minutes to draw): proto-JSON requests
with every GenerateRequest field (snake_case or camelCase) given values of its type, edge
values and junk of every JSON type (huge integers, 1e400 / NaN / Infinity, numbers as
strings, nested junk, unicode), unknown fields, lines that are JSON but no object, lines
that are no JSON at all; and every 20th line a fixed greedy "sentinel" request.

Every line must be answered, in order: a record (request_id, token_ids, text, ...) or an
error record whose message starts with "line N:"; the process exits 0 (no error) or 1
(some), never 2, never with a traceback; and every sentinel gets the same tokens as it
does alone (the other lines do not disturb it).

Accepted lines are kept cheap: max_new_tokens is forced into [1, 2] when it would run.

The runner's bugs found here (line separators other than "\n" splitting a line, a lone
surrogate request_id, a byte that is not UTF-8, deep nesting) have their own tests at the
end; line separators (U+2028, U+2029, U+0085, "\r", "\f") are generated again since the fix.
Lone surrogates, bytes that are not UTF-8 and deep nesting are left to those tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from service_harness import REPO, run_batch

pytestmark = pytest.mark.timeout(600)

# Each example is a subprocess of a few seconds: no shrinking (the failing line is named
# in the assertion message instead).
SETTINGS = settings(
    derandomize=True,  # the suite replays fixed examples (CI never flakes); scripts explore
    max_examples=12,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_NEW = 2
SENTINEL_EVERY = 20
SENTINEL = {"prompt": "Hello", "max_new_tokens": 2, "ignore_eos": True}
FINISH_REASONS = {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "FINISH_REASON_EOS"}


def _clean(text: str) -> str:
    """No "\n" inside a line: that is where a JSONL line ends, by definition."""
    return text.replace("\n", "")


TEXT = st.one_of(
    st.text(max_size=12),  # no lone surrogates (st.text never draws them)
    st.text(alphabet=st.sampled_from("ab \t\x00🙂é你\x7f\r\u2028\u2029\x85\x0c"), max_size=6),
    st.sampled_from(["", " ", "x" * 300, "🙂" * 40, "<|endoftext|>", "{{ x }}", "\x1b[31m"]),
).map(_clean)
NUMBER_TEXT = st.sampled_from(["7", "-1", "1e400", "NaN", "Infinity", "-Infinity", "0x10", ""])
HUGE_INTS = st.sampled_from([2**32, 2**63, 2**64, 2**64 - 1, -(2**63) - 1, 10**30, 10**300])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 600),
    HUGE_INTS,
    st.floats(),  # NaN, ±Infinity: written as JSON's non-standard literals
    TEXT,
    NUMBER_TEXT,
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
UINT32 = st.integers(0, 600) | st.sampled_from([2**31, 2**32 - 1]) | HUGE_INTS
IDS = st.lists(UINT32, max_size=8) | st.builds(lambda v, n: [v] * n, UINT32, st.integers(0, 1000))
FLOAT = st.floats() | st.floats(0, 1) | NUMBER_TEXT | st.sampled_from([1e-39, 0, 1, -0.0])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | TEXT, "content": TEXT}
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": TEXT | st.integers(),
    "prompt": TEXT,
    "prompt_token_ids": IDS,
    "max_new_tokens": st.integers(-2, 5000) | HUGE_INTS | NUMBER_TEXT,
    "temperature": FLOAT,
    "top_k": UINT32 | st.integers(-3, 0),
    "top_p": FLOAT,
    "seed": st.integers(-1, 2**64) | HUGE_INTS | NUMBER_TEXT | st.integers(0, 9).map(str),
    "stop": st.lists(TEXT, max_size=20),
    "stop_token_ids": IDS,
    "ignore_eos": st.booleans(),
    "priority": st.sampled_from(["HIGH", "low", "PRIORITY_NORMAL", "URGENT", "", 0, 3, 9, -1]),
    "min_p": FLOAT,
    "repetition_penalty": FLOAT,
    "frequency_penalty": FLOAT,
    "presence_penalty": FLOAT,
    "logprobs": st.booleans(),
    "top_logprobs": UINT32 | st.integers(-3, 0),
    "messages": st.lists(MESSAGE, max_size=3) | st.lists(JUNK, max_size=2),
}
CAMEL = {"prompt_token_ids": "promptTokenIds", "max_new_tokens": "maxNewTokens",
         "request_id": "requestId", "stop_token_ids": "stopTokenIds", "ignore_eos": "ignoreEos",
         "top_k": "topK", "top_p": "topP", "min_p": "minP", "top_logprobs": "topLogprobs",
         "repetition_penalty": "repetitionPenalty"}  # fmt: skip


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({}, optional=FIELDS))
    if draw(st.booleans()):  # a valid start most of the time
        body.setdefault("prompt", "Hello")
        body.setdefault("max_new_tokens", 1)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
        body[name] = draw(JUNK)  # a wrong type
    if _count(body.get("max_new_tokens")) and MAX_NEW < body["max_new_tokens"] <= 4096:
        body["max_new_tokens"] = 1 + body["max_new_tokens"] % MAX_NEW
    if draw(st.integers(0, 3)) == 0:
        body = {CAMEL.get(k, k): v for k, v in body.items()}
    if draw(st.integers(0, 5)) == 0:
        body |= draw(st.dictionaries(TEXT, JUNK, min_size=1, max_size=2))  # unknown fields
    return body


@st.composite
def lines(draw: st.DrawFn) -> str:
    """One JSONL line: mostly a request object; else JSON that is no object, or no JSON."""
    shape = draw(st.integers(0, 19))
    if shape == 0:
        return json.dumps(draw(JUNK))
    if shape == 1:  # broken JSON: a request cut short, or plain text
        text = json.dumps(draw(requests()))
        return _clean(text[: draw(st.integers(0, max(0, len(text) - 1)))] or draw(TEXT)) or "{"
    ascii_only = draw(st.booleans())
    return _clean(json.dumps(draw(requests()), ensure_ascii=ascii_only, allow_nan=True))


def batches() -> st.SearchStrategy[list[str]]:
    return st.lists(lines(), min_size=30, max_size=50)


def with_sentinels(drawn: list[str]) -> list[str]:
    out = []
    for i, line in enumerate(drawn):
        if i % SENTINEL_EVERY == 0:
            out.append(json.dumps({"request_id": f"sentinel-{i}", **SENTINEL}))
        out.append(line)
    return out


def _asked_max(line: str) -> int:
    try:
        obj = json.loads(line)
        value = obj.get("max_new_tokens", obj.get("maxNewTokens", 0))
        return int(value)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return 0


def _asked_id(line: str) -> Any:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return (obj.get("request_id") or obj.get("requestId")) if isinstance(obj, dict) else None


@pytest.fixture(scope="module")
def sentinel_tokens(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    proc, records = run_batch(default_model, tmp_path_factory.mktemp("alone"), [SENTINEL])
    assert proc.returncode == 0, proc.stderr
    return records[0]["token_ids"]


def check_batch(default_model: Path, tmp_path: Path, sent: list[str], want: list[int]) -> None:
    proc, records = _run_bytes(default_model, tmp_path, ("\n".join(sent) + "\n").encode())
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr[-3000:])
    numbered = [(n, line) for n, line in enumerate(sent, start=1) if line.strip()]
    assert len(records) == len(numbered), (len(records), len(numbered))
    errors = 0
    for (n, line), record in zip(numbered, records, strict=True):
        where = f"line {n}: {line[:300]!r} -> {json.dumps(record)[:300]}"
        asked = _asked_id(line)
        assert isinstance(record.get("request_id"), str), where
        if "error" in record:
            errors += 1
            assert record["error"].startswith(f"line {n}:"), where
            assert record["request_id"] == str(asked or f"line-{n}"), where
            continue
        assert record["request_id"] == (asked or f"line-{n}"), where
        tokens = record["token_ids"]
        # An accepted line asked for at most its own max_new_tokens (proto JSON also takes
        # the number as a string, "7", so a line may ask for more than the generator's cap).
        assert 1 <= len(tokens) <= max(MAX_NEW, _asked_max(line)), where
        assert record["finish_reason"] in FINISH_REASONS, where
        assert record["usage"]["completion_tokens"] == len(tokens), where
        assert isinstance(record["text"], str), where
        if record["request_id"].startswith("sentinel-"):
            assert tokens == want, where
    assert proc.returncode == (1 if errors else 0), proc.stderr[-2000:]


@SETTINGS
@given(drawn=batches())
def test_generated_jsonl_lines(
    default_model: Path, tmp_path_factory: pytest.TempPathFactory, sentinel_tokens, drawn
) -> None:
    sent = with_sentinels(drawn)
    check_batch(default_model, tmp_path_factory.mktemp("batch"), sent, sentinel_tokens)


def test_edge_lines_one_batch(default_model: Path, tmp_path: Path, sentinel_tokens) -> None:
    """Fixed edge lines, every one in one run next to sentinels."""
    edges = [
        "null", "[]", "{}", "1e400", '"text"', "true", "{", "}", "[1,", "{'a': 1}",
        '{"prompt": "x", "max_new_tokens": 1e400}',
        '{"prompt": "x", "max_new_tokens": NaN}',
        '{"prompt": "x", "max_new_tokens": -Infinity}',
        '{"prompt": "x", "max_new_tokens": 1, "temperature": NaN}',
        '{"prompt": "x", "max_new_tokens": 1, "temperature": 1e-39}',
        '{"prompt": "x", "max_new_tokens": 1, "seed": "18446744073709551616"}',
        '{"prompt": "x", "max_new_tokens": 1, "seed": -1}',
        '{"prompt": "x", "max_new_tokens": 1, "top_k": 1e30}',
        '{"prompt": "x", "max_new_tokens": 1, "prompt": "y"}',
        '{"prompt": "x", "max_new_tokens": 1, "maxNewTokens": 2}',
        '{"prompt": "x", "max_new_tokens": ' + "9" * 5000 + "}",  # over int()'s 4300 digits
        '{"prompt": "x", "max_new_tokens": 1, "stop": [' + ", ".join(['"a"'] * 500) + "]}",
        '{"prompt_token_ids": [' + ", ".join(["1"] * 3000) + '], "max_new_tokens": 1}',
        '{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 1}',
        '{"messages": [{"role": "user"}], "max_new_tokens": 1}',
        '{"messages": "hi", "max_new_tokens": 1}',
        '{"prompt": "' + "🙂" * 2000 + '", "max_new_tokens": 1}',
        '{"prompt": "\\u0000", "max_new_tokens": 1}',
        '{"prompt": "x", "max_new_tokens": 1, "request_id": "' + "r" * 129 + '"}',
        '{"prompt": "x", "max_new_tokens": 1, "request_id": "dup"}',
        '{"prompt": "x", "max_new_tokens": 1, "request_id": "dup"}',
        '{"prompt": "x", "max_new_tokens": 1, "request_id": 7}',
        '{"prompt": "x", "max_new_tokens": 1, "request_id": "\\u001b[31m\\n"}',
        '{"prompt": "x", "max_new_tokens": 1, "priority": 99}',
        '{"prompt": "x", "max_new_tokens": 1, "priority": "PRIORITY_PRIORITY_HIGH"}',
        " " * 10 + '{"prompt": "x", "max_new_tokens": 1}' + "\t",
        "[" * 50 + "]" * 50,
    ]  # fmt: skip
    check_batch(default_model, tmp_path, with_sentinels(edges), sentinel_tokens)


# -- known bugs of the offline runner: remove the marks once fixed ----------------------------
OK_LINE = '{"prompt": "Hello", "max_new_tokens": 2, "ignore_eos": true}'


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_line_separator_inside_a_json_string_is_one_line(
    default_model: Path, tmp_path: Path, separator: str
) -> None:
    line = '{"prompt": "a' + separator + 'b", "max_new_tokens": 2, "ignore_eos": true}'
    proc, records = run_batch(default_model, tmp_path, [line, OK_LINE])
    assert len(records) == 2, records
    assert all("error" not in r for r in records), records
    assert proc.returncode == 0, proc.stderr


def test_a_lone_surrogate_request_id_is_answered(default_model: Path, tmp_path: Path) -> None:
    bad = '{"request_id": "\\ud800", "prompt": "x", "max_new_tokens": 2}'
    proc, records = run_batch(default_model, tmp_path, [bad, OK_LINE])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(records) == 2 and "error" not in records[1], records
    assert proc.returncode in (0, 1)


def _run_bytes(default_model: Path, tmp_path: Path, data: bytes):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    args = ["--model", str(default_model), "--input", str(src), "--output", str(out)]
    args += ["--max-batch-size", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "worker.batch", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    # Split at "\n" only: a record may hold a raw U+2028 or U+0085 (ensure_ascii=False),
    # where service_harness.run_batch's splitlines() would cut it in two.
    text = out.read_text() if out.exists() else ""
    records = [json.loads(x) for x in text.split("\n") if x]
    return proc, records


def test_a_line_with_invalid_utf8_is_answered_alone(default_model: Path, tmp_path: Path) -> None:
    data = b'{"prompt": "a\xff", "max_new_tokens": 2}\n' + OK_LINE.encode() + b"\n"
    proc, records = _run_bytes(default_model, tmp_path, data)
    assert proc.returncode == 1, proc.stderr
    assert len(records) == 2 and records[0]["error"].startswith("line 1:"), records
    assert "error" not in records[1], records


def test_a_deeply_nested_line_is_answered_alone(default_model: Path, tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    proc, records = _run_bytes(default_model, tmp_path, f"{deep}\n{OK_LINE}\n".encode())
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(records) == 2 and records[0]["error"].startswith("line 1:"), records
    assert "error" not in records[1], records
