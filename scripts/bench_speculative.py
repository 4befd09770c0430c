"""Speculative decoding benchmark: tok/s with and without, acceptance rate, same tokens.

    .venv/bin/python scripts/bench_speculative.py [--model PATH] [--device auto|cpu|cuda]
        [--batch-sizes 1,8] [--max-new-tokens 128] [--num-speculative-tokens 4]
        [--draft-model PATH] [--repeats 2] [--quick] [--json out.json]

Two workloads of chat requests to the real default model (SmolLM2-135M-Instruct,
the GGUF `make model` fetches), greedy: `copy` (rewrite a paragraph replacing one
word by another, edit a function: the answer repeats the prompt, where prompt
lookup pays) and `open` (stories and explanations: little to look up, where
speculation must cost next to nothing). Each batch size runs the first B
prompts of a workload to completion, plain (num_speculative_tokens 0), with
prompt lookup (`ngram`) and, given --draft-model, with a draft model. Every
run is one `run_to_completion` of what the server runs per step (scheduling,
drafting, one forward pass, verification), after a warm-up request; the best of
--repeats runs counts. Greedy speculation must emit exactly plain decoding's
tokens: the `same tokens` column checks it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import fetch_model
from bench_common import machine_facts, print_records, print_table

from server.prompts import PromptEncoder
from worker.backend import Backend, select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import Checkpoint, load_checkpoint
from worker.engine_core import EngineCore

PARAGRAPHS = [
    (
        "cat",
        "dog",
        "The cat sat on the mat by the window, watching the birds in the garden. Every "
        "morning the cat waited for the sun to warm the glass, and every evening the cat "
        "slept by the fire until the house was quiet.",
    ),
    (
        "train",
        "bus",
        "The train left the station at seven. Passengers on the train read newspapers, "
        "drank coffee and looked out at the fields, and when the train reached the coast "
        "they stepped out into the cold morning air.",
    ),
    (
        "Monday",
        "Friday",
        "On Monday the team met to plan the release. By Monday evening the tests were "
        "green, and the release notes listed every change made since the previous Monday.",
    ),
]
CODE = """def total_price(items, tax_rate):
    total = 0.0
    for item in items:
        total += item.price * item.quantity
    total = total * (1 + tax_rate)
    return round(total, 2)
"""
COPY_PROMPTS = [
    *(
        f"Rewrite the following paragraph, replacing '{a}' with '{b}'. Keep everything "
        f"else the same.\n\n{text}"
        for a, b, text in PARAGRAPHS
    ),
    f"Rename the variable `total` to `subtotal` in this function; write out the whole "
    f"function.\n\n```python\n{CODE}```",
    f"Add a docstring to this function and write out the whole function.\n\n```python\n{CODE}```",
    f"Copy this text exactly.\n\n{PARAGRAPHS[0][2]}",
    f"Rewrite this paragraph in the past tense.\n\n{PARAGRAPHS[2][2]}",
    f"Repeat this code unchanged.\n\n```python\n{CODE}```",
]
OPEN_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "What are three good habits for a healthy life?",
    "Describe a busy market in a small town.",
    "Give advice to someone starting to learn the piano.",
    "Why do leaves change colour in autumn?",
    "Write a letter to a friend about a trip to the mountains.",
    "What makes a good teacher?",
]
WORKLOADS = {"copy": COPY_PROMPTS, "open": OPEN_PROMPTS}

COLUMNS = (
    "workload=workload:; batch=batch:d; mode=mode:; tokens=tokens:d; steps=steps:d; "
    "tok/s=tok_s:.1f; speed-up=speedup:.2f; tokens/step/seq=per_step:.2f; "
    "drafted/token=drafted:.2f; accepted=acceptance:; same tokens=same:"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", type=Path, default=None, help="default: make model's GGUF")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--draft-model", default="", help="also run method draft with it")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the best counts")
    ap.add_argument("--quick", action="store_true", help="a smoke run: batch 1 and 2, 12 tokens")
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats = "1,2", 12, 1
    return args


def modes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    k = args.num_speculative_tokens
    out: dict[str, dict[str, Any]] = {"plain": {}, "ngram": {"num_speculative_tokens": k}}
    if args.draft_model:
        out["draft"] = {"num_speculative_tokens": k, "draft_model": args.draft_model}
    return out


def make_processor(
    checkpoint: Checkpoint, backend: Backend, batch: int, **speculation: Any
) -> BatchProcessor:
    config = EngineConfig(
        max_batch_size=batch, kv_cache_mb=256, device=backend.device, **speculation
    )
    return BatchProcessor(checkpoint, config, backend)


def timed_run(processor: BatchProcessor, requests: list[Request]) -> tuple[float, int, dict]:
    """Seconds, engine steps, and the completions of one run to completion."""
    steps = 0

    def count(_: object) -> None:
        nonlocal steps
        steps += 1

    started = time.perf_counter()
    results = run_to_completion(processor, requests, count)
    return time.perf_counter() - started, steps, results


def bench_cell(
    args: argparse.Namespace,
    checkpoint: Checkpoint,
    backend: Backend,
    prompts: list[list[int]],
    workload: str,
    batch: int,
) -> list[dict[str, Any]]:
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    requests = [Request(f"{workload}{i}", prompts[i % len(prompts)], params) for i in range(batch)]
    records, plain_tokens, plain_tok_s = [], None, None
    for mode, speculation in modes(args).items():
        best = None
        for _ in range(args.repeats):  # a fresh engine each run: no state carried over
            processor = make_processor(checkpoint, backend, batch, **speculation)
            run_to_completion(
                processor, [Request("warm-up", prompts[0], SamplingParams(max_new_tokens=2))]
            )
            seconds, steps, results = timed_run(processor, requests)
            if best is None or seconds < best[0]:
                best = (seconds, steps, results, processor.get_stats())
        seconds, steps, results, stats = best
        tokens = {k: c.token_ids for k, c in results.items()}
        count = sum(len(t) for t in tokens.values())
        drafted = stats.draft_tokens
        tok_s = count / seconds
        if plain_tokens is None:
            plain_tokens, plain_tok_s = tokens, tok_s
        records.append(
            {
                "workload": workload,
                "batch": batch,
                "mode": mode,
                "tokens": count,
                "steps": steps,
                "seconds": seconds,
                "tok_s": tok_s,
                "speedup": tok_s / plain_tok_s,
                "per_step": count / steps / batch,
                "drafted": drafted / count,
                "draft_tokens": stats.draft_tokens,
                "accepted_draft_tokens": stats.accepted_draft_tokens,
                "acceptance": (f"{stats.accepted_draft_tokens / drafted:.0%}" if drafted else "-"),
                "same": "yes" if tokens == plain_tokens else "NO",
            }
        )
    return records


def default_model() -> Path:
    try:
        return fetch_model.fetch_gguf(log=lambda line: print(line, file=sys.stderr))
    except fetch_model.FetchError as err:
        sys.exit(f"the real default model is needed here: {err}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = select_backend(args.device)
    model = args.model or default_model()
    checkpoint = load_checkpoint(model, backend)
    encoder = PromptEncoder.from_ready(EngineCore(make_processor(checkpoint, backend, 1)).ready())
    print(f"# Speculative decoding benchmark: {model}, {backend.describe()}")
    print_table("Machine", ["", "value"], machine_facts(backend.xp, backend.describe()))
    records = []
    for workload, texts in WORKLOADS.items():
        prompts = [encoder.encode_chat([{"role": "user", "content": t}]) for t in texts]
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            records += bench_cell(args, checkpoint, backend, prompts, workload, batch)
    k = args.num_speculative_tokens
    print_records(
        f"Greedy, {args.max_new_tokens} new tokens per request, up to {k} draft tokens "
        f"(best of {args.repeats})",
        records,
        COLUMNS,
    )
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0 if all(r["same"] == "yes" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
