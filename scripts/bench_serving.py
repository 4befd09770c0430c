"""Serving overhead: the same workload through the in-process engine and through the server.

    .venv/bin/python scripts/bench_serving.py [--requests 200] [--quick] [--model DIR]

1. Engine: `run_to_completion` on a BatchProcessor in this process.
2. Server: `python -m server` with one worker and the same engine settings, driven
   at rate inf by the load generator (`client.bench`) with exactly the same prompts
   and output lengths.
Then the lone-request TTFT of a short prompt both ways. Prints tables with the
machine's ceilings; targets: server tok/s >= 0.9 x engine, TTFT(server) -
TTFT(engine) <= 5 ms. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import machine_facts, measure_ceilings, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_harness import start_server

from client.aio import AsyncShoalClient
from client.bench import BenchPlan, LengthDist, make_records, run_bench, summarize
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.model_config import load_model_config
from worker.random_checkpoint import default_cache_dir, write_checkpoint

LONE_PROMPT = list(range(1, 17))


def engine_run(model: Path, engine: EngineConfig, plan: BenchPlan, vocab: int) -> dict:
    records, prompts = make_records(plan, vocab)
    processor = BatchProcessor.from_model_dir(model, engine)
    requests = [
        Request(str(r.index), p, SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True))
        for r, p in zip(records, prompts, strict=True)
    ]
    run_to_completion(processor, requests[:1])  # warm-up, as the load generator does
    start = time.perf_counter()
    done = run_to_completion(processor, requests)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done.values())

    ttfts = []
    for i in range(20):
        t0 = time.perf_counter()
        processor.add_request(10_000 + i, LONE_PROMPT, SamplingParams(max_new_tokens=1))
        while not processor.process_step():
            pass
        ttfts.append((time.perf_counter() - t0) * 1000)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_ms": statistics.median(ttfts),
    }


async def server_run(target: str, plan: BenchPlan) -> dict:
    async with AsyncShoalClient(target) as client:
        records, wall = await run_bench(client, plan)
        summary = summarize(records, wall)
        ttfts = []
        for _ in range(20):
            t0 = time.perf_counter()
            async for chunk in client.generate(prompt_token_ids=LONE_PROMPT, max_new_tokens=1):
                if chunk.token_ids:
                    ttfts.append((time.perf_counter() - t0) * 1000)
    return {
        "tokens": summary["output_tokens"],
        "wall_s": wall,
        "tok_s": summary["output_tokens_per_s"],
        "ttft_ms": statistics.median(ttfts),
        "errors": summary["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--kv-cache-mb", type=float, default=1536)
    ap.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=0.0,
        help="the server's batching window (0: measure the transport alone)",
    )
    ap.add_argument("--quick", action="store_true", help="small model and workload (smoke test)")
    args = ap.parse_args(argv)
    preset = "default" if args.quick else "smollm2-135m"
    model = args.model or write_checkpoint(default_cache_dir() / f"{preset}-random", preset)
    requests = 16 if args.quick else args.requests
    plan = BenchPlan(
        requests=requests,
        rate=float("inf"),
        prompt_len=LengthDist(16, 64 if args.quick else 512),
        output_len=LengthDist(8 if args.quick else 16, 32 if args.quick else 256),
        seed=0,
    )
    engine = EngineConfig(
        max_batch_size=args.max_batch_size, kv_cache_mb=args.kv_cache_mb, device="cpu"
    )
    ceilings = measure_ceilings(np, quick=args.quick)
    print(f"# Serving overhead: {model} ({plan.requests} requests), cpu\n")
    print_table(
        "Machine",
        ["", "value"],
        [
            *machine_facts(np, "cpu"),
            ("copy GB/s", f"{ceilings['copy_gbps']:.1f}"),
            ("matmul GFLOP/s", f"{ceilings['matmul_gflops']:.1f}"),
        ],
    )

    local = engine_run(model, engine, plan, load_model_config(model).vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(
            model,
            Path(tmp) / "server.log",
            "--workers",
            "1",
            "--max-batch-size",
            str(args.max_batch_size),
            "--kv-cache-mb",
            str(args.kv_cache_mb),
            "--batch-timeout-ms",
            str(args.batch_timeout_ms),
        )
        try:
            served = asyncio.run(server_run(server.target, plan))
        finally:
            server.stop()

    ratio = served["tok_s"] / local["tok_s"]
    extra_ttft = served["ttft_ms"] - local["ttft_ms"]
    rows = [
        (
            "engine (worker.batch path, in process)",
            local["tokens"],
            f"{local['wall_s']:.1f}",
            f"{local['tok_s']:.1f}",
            f"{local['ttft_ms']:.1f}",
        ),
        (
            "server (gRPC + shared memory, 1 worker)",
            served["tokens"],
            f"{served['wall_s']:.1f}",
            f"{served['tok_s']:.1f}",
            f"{served['ttft_ms']:.1f}",
        ),
    ]
    print_table(
        "Same workload, rate inf",
        ["path", "output tokens", "wall s", "tok/s", "lone TTFT ms (median of 20)"],
        rows,
    )
    print_table(
        "Targets",
        ["target", "measured", "result"],
        [
            (
                "server tok/s / engine tok/s >= 0.9",
                f"{ratio:.3f}",
                "PASS" if ratio >= 0.9 else "MISS",
            ),
            (
                "TTFT server - engine <= 5 ms",
                f"{extra_ttft:.2f} ms",
                "PASS" if extra_ttft <= 5 else "MISS",
            ),
        ],
    )
    return 0 if not served["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
