"""`python -m client batch`: a JSONL file of requests through a server, N at a time.

The formats are those of `python -m worker.batch`. Each input line is the proto JSON of a
GenerateRequest, read by protobuf's json_format with the same rules (client/proto_json.py):
snake_case or camelCase names, "PRIORITY_HIGH" (or the short "HIGH", "low"), 64-bit integers
as strings. Output lines, in input order, carry request_id, token_ids, text, finish_reason
(the proto name, "FINISH_REASON_STOP"), usage and, when the line asked, logprobs, or for a
failed line
{"request_id", "error": "line N: <status code>: <details>"}. A line's request_id is its own
or "line-N"; lines without one are sent without one, so the server picks a unique id and
two batch runs against one server never collide.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from client.errors import ShoalError
from client.progress import Progress
from client.request import build_request
from client.types import Chunk, Completion, CompletionBuilder
from shoal.proto_json import parse_message
from shoal.v1 import inference_pb2 as pb

Record = dict[str, Any]


class GenerateClient(Protocol):
    """What the runner needs of a client: AsyncShoalClient, or a fake in tests."""

    def generate(self, prompt: str | None = None, **params: Any) -> AsyncIterator[Chunk]: ...


@dataclass(frozen=True)
class BatchJob:
    line_no: int
    request_id: str  # the id written to the output: the line's own, or "line-N"
    params: dict[str, Any]  # build_request keyword arguments, already checked


def error_record(request_id: str, line_no: int, code: str, details: str) -> Record:
    return {"request_id": request_id, "error": f"line {line_no}: {code}: {details}"}


def result_record(request_id: str, done: Completion, logprobs: bool = False) -> Record:
    """`logprobs`: the request asked for them; they are written as worker.batch writes them."""
    usage = None
    if done.usage is not None:
        usage = {
            "prompt_tokens": done.usage.prompt_tokens,
            "completion_tokens": done.usage.completion_tokens,
            "cached_prompt_tokens": done.usage.cached_prompt_tokens,
        }
    record: Record = {
        "request_id": request_id,
        "token_ids": list(done.token_ids),
        "text": done.text,
        "finish_reason": finish_reason_name(done.finish_reason),
        "usage": usage,
    }
    if logprobs:
        record["logprobs"] = [lp.as_dict() for lp in done.logprobs]
    return record


def finish_reason_name(short: str | None) -> str | None:
    """ "STOP" (the library's name) -> "FINISH_REASON_STOP" (the proto JSON name)."""
    if short is None:
        return None
    return pb.FinishReason.Name(pb.FinishReason.Value(f"FINISH_REASON_{short}"))


def request_params(request: pb.GenerateRequest) -> dict[str, Any]:
    """A GenerateRequest -> the build_request keyword arguments that rebuild it."""
    params: dict[str, Any] = {
        "prompt_token_ids": list(request.prompt_token_ids),
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_new_tokens": request.max_new_tokens,  # unset is 0, refused by the server
        "temperature": request.temperature,
        "top_k": request.top_k,
        "top_p": request.top_p,
        "min_p": request.min_p,
        "stop": list(request.stop),
        "stop_token_ids": list(request.stop_token_ids),
        "ignore_eos": request.ignore_eos,
        "priority": request.priority,
        "repetition_penalty": request.repetition_penalty,
        "frequency_penalty": request.frequency_penalty,
        "presence_penalty": request.presence_penalty,
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs,
    }
    for name in ("prompt", "seed"):  # optional: sent only when set
        if request.HasField(name):
            params[name] = getattr(request, name)
    if request.request_id:
        params["request_id"] = request.request_id
    return params


def parse_job(obj: Any, line_no: int) -> BatchJob:
    """One decoded JSON line -> BatchJob; ValueError/TypeError when it can't be sent."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    request = parse_message(obj, pb.GenerateRequest)
    params = request_params(request)
    build_request(**params)  # what the wire cannot carry (priority 7) fails here, not mid-run
    return BatchJob(line_no, request.request_id or f"line-{line_no}", params)


def parse_lines(lines: Iterable[str]) -> list[BatchJob | Record]:
    """Every non-blank line -> a job, or an INVALID_ARGUMENT error record; input order."""
    items: list[BatchJob | Record] = []
    seen: set[str] = set()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request_id = f"line-{line_no}"
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and (obj.get("request_id") or obj.get("requestId")):
                request_id = str(obj.get("request_id") or obj.get("requestId"))
            job = parse_job(obj, line_no)
            if job.request_id in seen:
                raise ValueError(f"request_id {job.request_id!r} is used twice")
            seen.add(job.request_id)
            items.append(job)
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            items.append(error_record(request_id, line_no, "INVALID_ARGUMENT", str(err)))
    return items


async def run_job(client: GenerateClient, job: BatchJob, progress: Progress | None) -> Record:
    builder = CompletionBuilder()
    try:
        async for chunk in client.generate(**job.params):
            builder.add(chunk)
            if progress:
                progress.update(tokens=len(chunk.token_ids))
    except grpc.RpcError as rpc_err:
        err = ShoalError.from_rpc(rpc_err)
        if progress:
            progress.update(done=1, failed=1)
        return error_record(job.request_id, job.line_no, err.code.name, err.details)
    if progress:
        progress.update(done=1)
    return result_record(job.request_id, builder.build(), bool(job.params.get("logprobs")))


async def run_batch(
    client: GenerateClient,
    items: list[BatchJob | Record],
    concurrency: int = 16,
    progress: Progress | None = None,
) -> list[Record]:
    """Run every job, at most `concurrency` at once; records come back in input order."""
    results: list[Record | None] = [i if isinstance(i, dict) else None for i in items]
    # One iterator shared by the runners: next() never awaits, so no two take the same job.
    todo = iter([(n, i) for n, i in enumerate(items) if isinstance(i, BatchJob)])

    async def runner() -> None:
        for n, job in todo:
            results[n] = await run_job(client, job, progress)

    await asyncio.gather(*(runner() for _ in range(max(1, concurrency))))
    return [r for r in results if r is not None]


def write_records(path: Path, records: Iterable[Record]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def count_failed(records: Iterable[Record]) -> int:
    return sum("error" in r for r in records)
