"""`python -m client batch`: a JSONL file of requests through a server, N at a time.

The formats are those of `python -m worker.batch`. Input lines carry GenerateRequest field
names (priority by name or number); output lines, in input order, carry request_id,
token_ids, text, finish_reason (name) and usage, or for a failed line
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
from client.request import RequestParams, build_request
from client.types import Chunk, Completion, CompletionBuilder

Record = dict[str, Any]
KNOWN_FIELDS = frozenset(RequestParams.__optional_keys__) | {"prompt"}


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


def result_record(request_id: str, done: Completion) -> Record:
    usage = None
    if done.usage is not None:
        usage = {
            "prompt_tokens": done.usage.prompt_tokens,
            "completion_tokens": done.usage.completion_tokens,
        }
    return {
        "request_id": request_id,
        "token_ids": list(done.token_ids),
        "text": done.text,
        "finish_reason": done.finish_reason,
        "usage": usage,
    }


def parse_job(obj: Any, line_no: int) -> BatchJob:
    """One decoded JSON line -> BatchJob; ValueError/TypeError when it can't be sent."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    params = dict(obj)
    # As in worker.batch, a missing max_new_tokens is 0 (rejected), not the library default.
    params.setdefault("max_new_tokens", 0)
    if params.get("request_id") is not None:
        params["request_id"] = str(params["request_id"])
    build_request(**params)  # wrong types fail here, with the line number, not mid-run
    return BatchJob(line_no, params.get("request_id") or f"line-{line_no}", params)


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
            if isinstance(obj, dict) and obj.get("request_id"):
                request_id = str(obj["request_id"])
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
    return result_record(job.request_id, builder.build())


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
