"""Prefix caching: TTFT and throughput with and without it, on the in-process engine.

    .venv/bin/python scripts/bench_prefix_cache.py [--model DIR] [--device auto|cpu|cuda]
        [--requests 64] [--system-tokens 512] [--question-tokens 32] [--max-new-tokens 16]
        [--turns 8] [--message-tokens 32] [--answer-tokens 32] [--max-batch-size 32] [--quick]

1. Shared system prompt: `--requests` requests arriving at once, each a
   `--system-tokens` system prompt followed by its own `--question-tokens`
   question: TTFT (arrival to first token) p50 / p90, output tokens/s over the
   whole run, and how many prompt tokens were computed.
2. A multi-turn conversation replayed turn by turn (one request at a time):
   each turn's prompt is the conversation so far (the system prompt, every
   earlier message and answer) plus a new `--message-tokens` message: TTFT per turn.

Each part runs on a fresh engine without prefix caching and on one with it
(same settings, same requests; greedy and `ignore_eos`, so the same tokens and
the same amount of output). The engine runs in this process (no front, no
gRPC): TTFT here is the engine's. The default model is the GGUF `make model`
fetches (random weights of its shape when offline); token ids are random.
Timings mean something only on an otherwise idle machine; `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_common import machine_facts, measure_ceilings, print_table
from bench_engine import default_model

from worker.backend import select_backend
from worker.batch_processor import BatchProcessor
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import load_checkpoint

MakeEngine = Callable[[bool], BatchProcessor]  # prefix caching on? -> a fresh engine


@dataclass
class RunResult:
    tokens: list[list[int]]  # each request's output, in submission order
    ttft_s: list[float]  # each request's arrival (all at the start) to its first token
    wall_s: float
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def output_tokens(self) -> int:
        return sum(map(len, self.tokens))


def run(processor: BatchProcessor, prompts: list[list[int]], new_tokens: int) -> RunResult:
    """Submit every prompt at once and step until all are done."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    hits_before = processor.get_stats().prefix_cache_hit_tokens
    tokens: list[list[int]] = [[] for _ in prompts]
    first: dict[int, float] = {}
    start = time.perf_counter()
    for handle, ids in enumerate(prompts):
        processor.add_request(handle, ids, params)
    while processor.has_work():
        records = processor.process_step()
        now = time.perf_counter()
        for r in records:
            first.setdefault(r.handle, now - start)
            tokens[r.handle].append(r.token_id)
    wall = time.perf_counter() - start
    return RunResult(
        tokens=tokens,
        ttft_s=[first[h] for h in range(len(prompts))],
        wall_s=wall,
        prompt_tokens=sum(map(len, prompts)),
        cached_tokens=processor.get_stats().prefix_cache_hit_tokens - hits_before,
    )


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(1, vocab, size=n).tolist()


def warm_up(processor: BatchProcessor, vocab: int) -> None:
    """Load the code paths on a prompt unlike the measured ones (it caches nothing they use)."""
    run(processor, [random_ids(np.random.default_rng(99), 24, vocab)], 2)


def shared_system_prompt(args: argparse.Namespace, make: MakeEngine, vocab: int) -> None:
    rng = np.random.default_rng(0)
    system = random_ids(rng, args.system_tokens, vocab)
    prompts = [system + random_ids(rng, args.question_tokens, vocab) for _ in range(args.requests)]
    rows, outputs = [], []
    for caching in (False, True):
        processor = make(caching)
        warm_up(processor, vocab)
        r = run(processor, prompts, args.max_new_tokens)
        outputs.append(r.tokens)
        ttft = sorted(r.ttft_s)
        rows.append(
            [
                "on" if caching else "off",
                f"{1000 * statistics.median(ttft):.0f}",
                f"{1000 * ttft[round(0.9 * (len(ttft) - 1))]:.0f}",
                f"{r.output_tokens / r.wall_s:.1f}",
                f"{r.wall_s:.2f}",
                f"{r.prompt_tokens - r.cached_tokens:,} of {r.prompt_tokens:,}",
            ]
        )
    same = "identical" if outputs[0] == outputs[1] else "DIFFERENT"
    print_table(
        f"Shared system prompt: {args.requests} requests at once, {args.system_tokens}-token "
        f"system prompt + {args.question_tokens}-token question, {args.max_new_tokens} tokens "
        f"out (outputs with and without: {same})",
        ["prefix caching", "TTFT p50 ms", "TTFT p90 ms", "out tok/s", "wall s", "prompt computed"],
        rows,
    )


def multi_turn(args: argparse.Namespace, make: MakeEngine, vocab: int) -> None:
    turns: dict[bool, list[tuple[int, RunResult]]] = {}
    for caching in (False, True):
        rng = np.random.default_rng(1)  # the same messages both times
        processor = make(caching)
        warm_up(processor, vocab)
        conversation = random_ids(rng, args.system_tokens, vocab)
        turns[caching] = []
        for _ in range(args.turns):
            conversation += random_ids(rng, args.message_tokens, vocab)
            r = run(processor, [conversation], args.answer_tokens)
            turns[caching].append((len(conversation), r))
            conversation += r.tokens[0]  # the answer is part of the next turn's prompt
    rows = []
    for turn, ((length, off), (_, on)) in enumerate(zip(turns[False], turns[True], strict=True)):
        rows.append(
            [
                turn + 1,
                length,
                on.cached_tokens,
                f"{1000 * off.ttft_s[0]:.0f}",
                f"{1000 * on.ttft_s[0]:.0f}",
                f"{off.ttft_s[0] / on.ttft_s[0]:.1f}x",
                "yes" if off.tokens == on.tokens else "NO",
            ]
        )
    print_table(
        f"Multi-turn conversation, turn by turn: a {args.system_tokens}-token system prompt, "
        f"{args.message_tokens}-token messages, {args.answer_tokens}-token answers",
        ["turn", "prompt tokens", "cached", "TTFT off ms", "TTFT on ms", "speed-up", "same answer"],
        rows,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", type=Path, default=None, help="default: the `make model` GGUF")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--message-tokens", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--kv-cache-mb", type=float, default=512)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.system_tokens, args.question_tokens = 6, 48, 8
        args.max_new_tokens, args.turns, args.message_tokens, args.answer_tokens = 3, 3, 8, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = select_backend(args.device)
    model_dir = args.model or default_model()
    checkpoint = load_checkpoint(model_dir, backend)
    vocab = checkpoint.config.vocab_size

    def make(caching: bool) -> BatchProcessor:
        config = EngineConfig(
            max_batch_size=args.max_batch_size,
            kv_cache_mb=args.kv_cache_mb,
            device=args.device,
            prefix_caching=caching,
        )
        return BatchProcessor(checkpoint, config, backend)

    print(f"# Prefix caching benchmark: {model_dir}, {backend.describe()}")
    ceil = measure_ceilings(backend.xp, args.quick)
    facts = [
        *machine_facts(backend.xp, backend.describe()),
        (f"copy GB/s ({ceil['copy_mib']} MiB f32, read + write)", f"{ceil['copy_gbps']:.1f}"),
        (f"matmul GFLOP/s ({ceil['matmul_n']}^2 f32)", f"{ceil['matmul_gflops']:.1f}"),
    ]
    print_table("Machine and ceilings", ["", "value"], facts)
    shared_system_prompt(args, make, vocab)
    multi_turn(args, make, vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
