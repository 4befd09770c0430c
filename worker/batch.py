"""Offline batch inference in one process, no gRPC.

    python -m worker.batch --model DIR --input IN.jsonl --output OUT.jsonl
        [--device auto|cpu|cuda] [--max-batch-size B] [--kv-cache-mb M]
        [--no-prefix-caching]

The same request pipeline as the server (server/frontend.py: one validation,
the pending queue, one detokenizer and stop-string matcher) over the engine
in this process (worker/inprocess.py) instead of worker processes.

Each input line is the proto JSON of a GenerateRequest, parsed by protobuf's
json_format (server/proto_json.py): what grpcurl sends and `MessageToJson`
writes (snake_case or camelCase names, "PRIORITY_HIGH", 64-bit integers as
strings), plus the short priority names ("HIGH", "low"). Output lines, in
input order, carry request_id, token_ids, text, finish_reason (the proto name,
"FINISH_REASON_STOP"), usage and, for a request that asked, logprobs (one
{token_id, logprob, top} per token): the proto JSON of one GenerateChunk holding
the whole completion. A bad line is answered with an `error` naming its line
number and field; the rest still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from server.config import ServerConfig
from server.frontend import Frontend
from server.proto_json import (
    fields_from_proto,
    finish_reason_name,
    logprobs_json,
    request_from_json,
)
from server.requests import RequestError, RequestState
from server.validation import InvalidRequest, validate
from worker.batch_processor import BatchProcessor
from worker.channel.types import DEFAULT_KV_CACHE_MB
from worker.engine_core import EngineCore
from worker.inprocess import InProcessEngine
from worker.progress import ProgressBar


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"))
    parser.add_argument("--max-batch-size", type=int, default=int(os.environ.get("BATCH_SIZE", 32)))
    parser.add_argument(
        "--kv-cache-mb",
        type=float,
        default=float(os.environ.get("KV_CACHE_MB", DEFAULT_KV_CACHE_MB)),
    )
    parser.add_argument("--prefill-token-budget", type=int, default=512)
    speculation = parser.add_argument_group("speculative decoding (flags as in python -m server)")
    speculation.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=int(os.environ.get("NUM_SPECULATIVE_TOKENS", 0)),
        help="draft tokens verified per sequence per step (0 = off)",
    )
    speculation.add_argument(
        "--speculative-method",
        default=os.environ.get("SPECULATIVE_METHOD", ""),
        help="ngram (prompt lookup) or draft (--draft-model)",
    )
    speculation.add_argument("--draft-model", default=os.environ.get("DRAFT_MODEL", ""))
    speculation.add_argument(
        "--prompt-lookup-max", type=int, default=int(os.environ.get("PROMPT_LOOKUP_MAX", 4))
    )
    speculation.add_argument(
        "--prompt-lookup-min", type=int, default=int(os.environ.get("PROMPT_LOOKUP_MIN", 2))
    )
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="each request's logits bitwise independent of the batch (docs/batch-invariance.md)",
    )
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep and share the KV blocks of equal prompt prefixes (--no-prefix-caching: off)",
    )
    return parser.parse_args(argv)


def read_lines(path: Path) -> list[tuple[int, str | None]]:
    """(line number, text) of every non-blank line; text None for a line that is not UTF-8.

    Lines end at "\n" only (JSONL): U+2028 and friends are valid inside a JSON string.
    """
    numbered = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text: str | None = raw.decode().rstrip("\r")
        except UnicodeDecodeError:
            text = None
        if text is None or text.strip():
            numbered.append((n, text))
    return numbered


def submit_line(front: Frontend, line_no: int, line: str | None) -> RequestState:
    """Parse, validate and queue one line; InvalidRequest / ValueError names the field."""
    if line is None:
        raise InvalidRequest("the line is not valid UTF-8")
    try:
        message = request_from_json(line)
    except RecursionError:
        raise InvalidRequest("the line nests JSON too deeply") from None
    if not message.request_id:
        message.request_id = f"line-{line_no}"
    request = validate(fields_from_proto(message), front.limits(), front.prompts)
    return front.submit(request)


async def collect(state: RequestState, progress: ProgressBar) -> dict[str, Any]:
    """Follow one request to its end; its output record (or an error record)."""
    tokens: list[int] = []
    text: list[str] = []
    logprobs = []
    try:
        async for chunk in state.follow(0):
            tokens += chunk.token_ids
            text.append(chunk.text)
            logprobs += chunk.logprobs
            progress.update(tokens=len(chunk.token_ids))
    except RequestError as err:
        progress.update(done=1)
        return {"request_id": state.request_id, "error": str(err)}
    progress.update(done=1)
    record = {
        "request_id": state.request_id,
        "token_ids": tokens,
        "text": "".join(text),
        "finish_reason": finish_reason_name(state.finish_reason),
        "usage": {
            "prompt_tokens": len(state.request.prompt_ids),
            "completion_tokens": len(tokens),
            "cached_prompt_tokens": state.cached_prompt_tokens or 0,
        },
    }
    if state.request.params.logprobs:
        record["logprobs"] = logprobs_json(logprobs)
    return record


async def run(
    args: argparse.Namespace,
    config: ServerConfig,
    lines: list[tuple[int, str]],
    processor: BatchProcessor,
) -> int:
    engine = InProcessEngine(EngineCore(processor))
    front = Frontend(config, engine)
    front.start()
    while not front.serving:
        if engine.error:
            raise RuntimeError(engine.error)
        await asyncio.sleep(0.01)

    started = time.perf_counter()
    pending: list[RequestState | dict[str, Any]] = []
    for line_no, line in lines:
        try:
            pending.append(submit_line(front, line_no, line))
        except ValueError as err:  # InvalidRequest, DuplicateRequestId, JSONDecodeError
            message = f"line {line_no}: {err}"
            print(message, file=sys.stderr)
            pending.append({"request_id": _line_id(line, line_no), "error": message})
    admitted = sum(isinstance(p, RequestState) for p in pending)
    progress = ProgressBar(total=admitted, stream=sys.stderr)

    async def record(item: RequestState | dict[str, Any]) -> dict[str, Any]:
        return await collect(item, progress) if isinstance(item, RequestState) else item

    records = await asyncio.gather(*map(record, pending))
    progress.close()
    await front.drain()

    with args.output.open("w") as out:
        for record in records:
            out.write(_json_line(record))
    errors = sum("error" in r for r in records)
    elapsed = time.perf_counter() - started
    print(f"{len(records) - errors} requests in {elapsed:.1f} s, {errors} failed", file=sys.stderr)
    stats = processor.get_stats()
    if stats.draft_tokens:
        rate = stats.accepted_draft_tokens / stats.draft_tokens
        print(
            f"speculative decoding: {stats.accepted_draft_tokens} of {stats.draft_tokens} "
            f"draft tokens accepted ({rate:.0%})",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _json_line(record: dict[str, Any]) -> str:
    """One output line; text that cannot be UTF-8 (a lone surrogate) is written escaped."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode()
    except UnicodeEncodeError:
        line = json.dumps(record) + "\n"
    return line


def _line_id(line: str | None, line_no: int) -> str:
    """The request_id a bad line asked for, if it can be read; else line-N."""
    try:
        obj = json.loads(line) if line is not None else None
    except (ValueError, RecursionError):
        obj = None
    asked = (obj.get("request_id") or obj.get("requestId")) if isinstance(obj, dict) else None
    return str(asked or f"line-{line_no}")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every line succeeded, 1 when some failed, 2 when nothing could run."""
    args = parse_args(argv)
    try:
        lines = read_lines(args.input)
        if not args.output.parent.is_dir():
            raise FileNotFoundError(f"--output {args.output}: no such directory")
        config = ServerConfig(
            model=str(args.model),
            device=args.device,
            max_batch_size=args.max_batch_size,
            kv_cache_mb=args.kv_cache_mb,
            prefill_token_budget=args.prefill_token_budget,
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_method=args.speculative_method,
            draft_model=args.draft_model,
            prompt_lookup_max=args.prompt_lookup_max,
            prompt_lookup_min=args.prompt_lookup_min,
            batch_invariant=args.batch_invariant,
            prefix_caching=args.prefix_caching,
            max_queue_len=max(1, len(lines)),
            retention_count=max(1, len(lines)),
            batch_timeout_ms=0,
        )
        processor = BatchProcessor.from_model_dir(args.model, config.engine)
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError is a ValueError
        print(f"python -m worker.batch: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, config, lines, processor))
    except RuntimeError as err:  # the engine failed (InProcessEngine.error)
        print(f"python -m worker.batch: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
