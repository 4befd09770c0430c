"""Log formats (text and JSON lines), the request summary, and --log-format."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pytest

from server.config import ServerConfig
from server.logs import JsonFormatter, TextFormatter, request_fields
from server.requests import RequestError, RequestState
from server.validation import ValidatedRequest
from worker.channel.types import FinishReason, Priority, SamplingParams


def record(fields: dict | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(
        "shoal.requests", logging.INFO, __file__, 1, "done %s", ("x",), exc_info
    )
    if fields is not None:
        rec.fields = fields
    return rec


def test_json_lines_carry_the_fields_at_the_top_level() -> None:
    line = JsonFormatter().format(record({"request_id": "a b", "worker": None, "ms": 1.5}))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "done x" and entry["logger"] == "shoal.requests"
    assert entry["level"] == "INFO" and entry["ts"].endswith("+00:00")
    assert (entry["request_id"], entry["worker"], entry["ms"]) == ("a b", None, 1.5)
    failed = json.loads(JsonFormatter().format(record(exc=True)))
    assert "ValueError: boom" in failed["exc"]


def test_text_lines_append_key_value_pairs_quoting_what_needs_it() -> None:
    line = TextFormatter().format(record({"request_id": 'a "b"\nc', "worker": None, "n": 3}))
    first, *rest = line.split("\n")
    assert not rest  # a client-chosen id cannot start a fake log line
    assert first.endswith(r'done x request_id="a \"b\"\nc" worker=- n=3')
    assert TextFormatter().format(record()).endswith("shoal.requests: done x")
    assert TextFormatter().format(record({"k": "v"}, exc=True)).split("\n")[0].endswith("k=v")


class _Text:
    """Stands in for IncrementalText: request_fields reads no text."""

    stopped = False

    def finish(self) -> str:
        return ""


def test_request_fields_summarise_a_finished_request() -> None:
    request = ValidatedRequest("r1", [1, 2, 3], SamplingParams(max_new_tokens=4), Priority.HIGH, ())
    state = RequestState("r1", 1, request, _Text(), arrival=100.0)  # type: ignore[arg-type]
    state.dispatched_at, state.worker = 100.010, 1
    state.token_ids = [5, 6]
    state.cached_prompt_tokens = 0
    state.first_token_at = 100.030
    state.finish(FinishReason.LENGTH)
    state.finished_at = 100.050
    fields = request_fields(state)
    assert fields == {
        "request_id": "r1",
        "priority": "high",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_prompt_tokens": 0,
        "queue_ms": pytest.approx(10),
        "ttft_ms": pytest.approx(30),
        "total_ms": pytest.approx(50),
        "finish_reason": "length",
        "error": None,
        "worker": 1,
        "handle": 1,
        "resumptions": 0,
    }
    queued = RequestState("r2", 2, request, _Text(), arrival=100.0)  # type: ignore[arg-type]
    queued.finish(FinishReason.CANCELLED, RequestError("UNAVAILABLE", "draining"))
    queued.finished_at = 100.5
    fields = request_fields(queued)
    assert (fields["worker"], fields["ttft_ms"], fields["error"]) == (None, None, "UNAVAILABLE")
    assert fields["cached_prompt_tokens"] is None
    assert fields["queue_ms"] == fields["total_ms"] == pytest.approx(500)


def test_log_format_flag_env_and_validation() -> None:
    assert ServerConfig(model="m").log_format == "text"
    assert ServerConfig.from_args(["--model", "m"], {"LOG_FORMAT": "JSON"}).log_format == "json"
    flags = ["--model", "m", "--log-format", "text"]
    assert ServerConfig.from_args(flags, {"LOG_FORMAT": "json"}).log_format == "text"
    with pytest.raises(ValueError, match=r"log_format \(--log-format / \$LOG_FORMAT\).*json"):
        dataclasses.replace(ServerConfig(model="m"), log_format="xml")
    with pytest.raises(ValueError, match=r"metrics_port .* must differ from port"):
        ServerConfig(model="m", port=9000, metrics_port=9000)
    assert ServerConfig(model="m", port=0, metrics_port=0).metrics_port == 0
