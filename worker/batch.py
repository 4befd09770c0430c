"""Offline batch inference in one process, no gRPC.

    python -m worker.batch --model DIR --input IN.jsonl --output OUT.jsonl
        [--device auto|cpu|cuda] [--max-batch-size B] [--kv-cache-mb M]

Input lines carry GenerateRequest field names; output lines carry request_id,
token_ids, text, finish_reason and usage, in input order. A bad line is
answered with an `error` naming its line number and field; the rest still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from worker.batch_processor import BatchProcessor
from worker.engine_config import EngineConfig
from worker.offline import Completion, Request, run_to_completion
from worker.progress import ProgressBar
from worker.sequence import FinishReason, Priority, SamplingParams, TokenEvent

PRIORITIES = {
    "UNSPECIFIED": Priority.NORMAL,
    "HIGH": Priority.HIGH,
    "NORMAL": Priority.NORMAL,
    "LOW": Priority.LOW,
    0: Priority.NORMAL,
    1: Priority.HIGH,
    2: Priority.NORMAL,
    3: Priority.LOW,
}  # names and numbers of the wire enum shoal.v1.Priority
KNOWN_FIELDS = {
    "request_id",
    "prompt",
    "prompt_token_ids",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "priority",
}


@dataclass
class BatchItem:
    request: Request
    stop: tuple[str, ...]


def _number(obj: dict[str, Any], name: str, default: float, kind: type = float) -> Any:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number (got {value!r})")
    if kind is int and value != int(value):
        raise ValueError(f"{name} must be an integer (got {value!r})")
    return kind(value)


def parse_request(obj: Any, line_no: int, tokenizer: Tokenizer, vocab: int) -> BatchItem:
    """One JSON object -> BatchItem; ValueError names the field and the limit."""
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError("exactly one of prompt or prompt_token_ids must be set")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError("prompt must be a non-empty string")
        prompt_ids = tokenizer.encode(obj["prompt"]).ids
    else:
        prompt_ids = obj["prompt_token_ids"]
        if not isinstance(prompt_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids
        ):
            raise ValueError("prompt_token_ids must be a list of integers")
    max_new = _number(obj, "max_new_tokens", 0, int)
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be > 0 (got {max_new})")
    temperature = _number(obj, "temperature", 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (got {temperature})")
    top_k = _number(obj, "top_k", 0, int)
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, {vocab}] (got {top_k})")
    top_p = _number(obj, "top_p", 1.0)
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (got {top_p})")
    seed = _number(obj, "seed", int.from_bytes(os.urandom(8), "little"), int)
    if not 0 <= seed < 2**64:
        raise ValueError("seed must fit in uint64")
    stop = obj.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a list of non-empty strings")
    stop_ids = obj.get("stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise ValueError("stop_token_ids must be a list of integers")
    if obj.get("priority", 0) not in PRIORITIES:
        raise ValueError(f"priority must be one of HIGH, NORMAL, LOW (got {obj['priority']!r})")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(obj.get("ignore_eos", False)),
    )
    request_id = str(obj.get("request_id") or f"line-{line_no}")
    priority = PRIORITIES[obj.get("priority", 0)]
    return BatchItem(Request(request_id, prompt_ids, params, priority), tuple(stop))


class StopStringWatcher:
    """Ends a request once its decoded text contains one of its stop strings."""

    def __init__(self, processor: BatchProcessor, items: dict[str, BatchItem]) -> None:
        self.processor = processor
        self.stops = {rid: item.stop for rid, item in items.items() if item.stop}
        self.tokens: dict[str, list[int]] = {rid: [] for rid in self.stops}
        self.stopped: set[str] = set()

    def __call__(self, events: list[TokenEvent]) -> None:
        for event in events:
            if event.request_id not in self.stops or event.token_id < 0:
                continue
            self.tokens[event.request_id].append(event.token_id)
            text = self.processor.tokenizer.decode(self.tokens[event.request_id])
            if (
                event.finish_reason == FinishReason.NONE
                and cut_at_stop(text, self.stops[event.request_id]) != text
            ):
                self.stopped.add(event.request_id)
                self.processor.cancel(event.request_id)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Text before the earliest stop string (the stop text itself is not emitted)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def output_record(item: BatchItem, done: Completion, tokenizer: Tokenizer, stopped: bool) -> dict:
    tokens = [t for t in done.token_ids if t >= 0]
    text = tokenizer.decode(tokens)
    reason = done.finish_reason
    if item.stop:
        clipped = cut_at_stop(text, item.stop)
        if clipped != text or stopped:
            text, reason = clipped, FinishReason.STOP
    return {
        "request_id": done.request_id,
        "token_ids": tokens,
        "text": text,
        "finish_reason": reason.name,
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(tokens)},
    }


def read_items(path: Path, processor: BatchProcessor) -> list[BatchItem | dict]:
    """Each input line -> a BatchItem, or an error record naming the line and field."""
    items: list[BatchItem | dict] = []
    seen: set[str] = set()
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        request_id = f"line-{line_no}"
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("request_id"):
                request_id = str(obj["request_id"])
            item = parse_request(
                obj, line_no, processor.tokenizer, processor.model_config.vocab_size
            )
            if item.request.request_id in seen:
                raise ValueError(f"request_id {item.request.request_id!r} is used twice")
            processor.validate(item.request.prompt_ids, item.request.params, [])
            seen.add(item.request.request_id)
            items.append(item)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            message = f"line {line_no}: {err}"
            print(message, file=sys.stderr)
            items.append({"request_id": request_id, "error": message})
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"))
    parser.add_argument("--max-batch-size", type=int, default=int(os.environ.get("BATCH_SIZE", 32)))
    parser.add_argument(
        "--kv-cache-mb", type=float, default=float(os.environ.get("KV_CACHE_MB", 256))
    )
    parser.add_argument("--prefill-token-budget", type=int, default=512)
    args = parser.parse_args(argv)

    config = EngineConfig(
        max_batch_size=args.max_batch_size,
        kv_cache_mb=args.kv_cache_mb,
        prefill_token_budget=args.prefill_token_budget,
        device=args.device,
    )
    processor = BatchProcessor.from_model_dir(args.model, config)
    items = read_items(args.input, processor)
    valid = {i.request.request_id: i for i in items if isinstance(i, BatchItem)}

    progress = ProgressBar(total=len(valid), stream=sys.stderr)
    watcher = StopStringWatcher(processor, valid)
    started = time.perf_counter()

    def on_events(events: list[TokenEvent]) -> None:
        watcher(events)
        progress.update(
            done=sum(e.finish_reason != FinishReason.NONE for e in events),
            tokens=sum(e.token_id >= 0 for e in events),
        )

    results = run_to_completion(processor, [i.request for i in valid.values()], on_events)
    progress.close()
    with args.output.open("w") as out:
        for item in items:
            if isinstance(item, dict):
                record = item
            else:
                rid = item.request.request_id
                record = output_record(
                    item, results[rid], processor.tokenizer, rid in watcher.stopped
                )
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elapsed = time.perf_counter() - started
    errors = len(items) - len(valid)
    print(f"{len(valid)} requests in {elapsed:.1f} s, {errors} rejected", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
