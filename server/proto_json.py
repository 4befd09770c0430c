"""The proto edge without gRPC: protobuf messages and their JSON form to plain values.

- `fields_from_proto`: a `GenerateRequest` (from the wire or from JSON) -> `RequestFields`.
- `request_from_json`: one JSON object (a JSONL line of `python -m worker.batch`) -> a
  `GenerateRequest`, parsed by protobuf's own `json_format`, so a line is exactly what
  grpcurl, `buf curl` or any language's `MessageToJson` accepts and writes: field names in
  snake_case or lowerCamelCase, enums by their full names ("PRIORITY_HIGH") or numbers,
  64-bit integers as JSON strings or numbers ("seed": "7"). One extension: `priority` also
  takes the short names ("HIGH", "normal", "low"). Every error names the field (its proto
  name, with the list index: `messages[1].content`) and what it must be.
- `finish_reason_name`: the proto name of a finish reason ("FINISH_REASON_STOP").
- `logprobs_json`: TokenLogprobs as the JSON of GenerateChunk.logprobs (proto field names).

`python -m client batch` reads its input with the same `parse_message` (shoal/proto_json.py,
beside the stubs, since client/ may not import server/).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from google.protobuf.message import Message

from server.validation import InvalidRequest, RequestFields
from shoal.proto_json import parse_message
from shoal.v1 import inference_pb2 as pb
from worker.channel.types import FinishReason, TokenLogprob

FINISH_REASONS = {
    FinishReason.NONE: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def finish_reason_name(reason: FinishReason) -> str:
    """FinishReason.STOP -> "FINISH_REASON_STOP" (the proto JSON form)."""
    return pb.FinishReason.Name(FINISH_REASONS[reason])


def logprobs_json(logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """[{"token_id", "logprob", "top": [{"token_id", "logprob"}, ...]}, ...], as the proto
    fields are named (the offline output's other keys are snake_case too)."""
    return [
        {
            "token_id": lp.token_id,
            "logprob": lp.logprob,
            "top": [{"token_id": t, "logprob": v} for t, v in lp.top],
        }
        for lp in logprobs
    ]


def fields_from_proto(request: pb.GenerateRequest) -> RequestFields:
    """Copy every RequestFields field of the same name; unset optional fields stay None."""
    values: dict[str, object] = {}
    for spec in dataclasses.fields(RequestFields):
        value = getattr(request, spec.name)
        if spec.default is None and not request.HasField(spec.name):
            value = None
        elif not isinstance(value, str | int | float | bool):  # a repeated field
            value = [_plain(v) if isinstance(v, Message) else v for v in value]
        values[spec.name] = value
    return RequestFields(**values)  # type: ignore[arg-type]


def _plain(message: Message) -> dict[str, object]:
    """A nested message (ChatMessage) as a dict of all its fields, empty ones included."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def request_from_json(line: str | Any) -> pb.GenerateRequest:
    """A JSON text (or an already decoded object) -> GenerateRequest; InvalidRequest names
    the field. Values are not checked here beyond their types (that is `validate`'s job)."""
    if isinstance(line, str):
        try:
            line = json.loads(line)
        except ValueError as err:
            raise InvalidRequest(f"not a JSON object ({err})") from None
    try:
        return parse_message(line, pb.GenerateRequest)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def fields_from_json(line: str | Any) -> RequestFields:
    return fields_from_proto(request_from_json(line))
