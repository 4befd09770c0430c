"""Logging for the front: readable text by default, JSON lines with `--log-format json`.

Both formats carry structured fields: a call passes `extra={"fields": {...}}`;
text appends them as `key=value`, JSON puts them at the top level of the
line's object. Each finished request gets one such line (`request_fields`).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from server.config import LOG_FORMATS
from server.requests import RequestState

REQUEST_LOGGER = "shoal.requests"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
        if not pairs:
            return line
        # Keep the pairs on the first line: a traceback, if any, follows them.
        head, sep, rest = line.partition("\n")
        return f"{head} {pairs}{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """Send every logger to stderr in the chosen format (replaces earlier handlers)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def request_fields(state: RequestState) -> dict[str, Any]:
    """The summary of a finished request (milliseconds since its arrival at the front)."""

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    return {
        "request_id": state.request_id,
        "priority": state.request.priority.name.lower(),
        "prompt_tokens": len(state.request.prompt_ids),
        "completion_tokens": len(state.token_ids),
        "cached_prompt_tokens": state.cached_prompt_tokens,  # null: no worker reported
        "queue_ms": ms(state.queue_s),
        "ttft_ms": ms(state.ttft_s),  # null: no token came
        "total_ms": ms(state.total_s),
        "finish_reason": state.finish_reason.name.lower(),
        "error": state.error.code if state.error is not None else None,
        "worker": state.worker,  # null: never dispatched
        "handle": state.handle,  # the request's name in worker log lines
        "resumptions": state.resumptions,  # resumed after a worker died, this many times
    }


def _text(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    # Quote what would break `key=value` splitting or the line (ids are client-chosen):
    # control characters (\n, \r, ESC, ...) come out escaped as JSON escapes.
    if not text or any(c in text for c in ' "=') or not text.isprintable():
        quoted = json.dumps(text, ensure_ascii=False)  # escapes only " \\ and C0 controls
        return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted)
    return text
