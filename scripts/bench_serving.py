"""Serving overhead: the same workload through the in-process engine and through the server.

    .venv/bin/python scripts/bench_serving.py [--requests 200] [--quick] [--model DIR]

1. Engine: `run_to_completion` on a BatchProcessor in this process (no front).
2. Offline: `python -m worker.batch` on the same requests as JSONL: the front's
   pipeline (validation, queue, detokenizer) over the engine in-process.
3. Server: `python -m server` with one worker and the same engine settings, driven
   at rate inf by the load generator (`client.bench`) with exactly the same prompts
   and output lengths.
Then the lone-request TTFT of a short prompt both ways. Prints tables with the
machine's ceilings; targets: server tok/s >= 0.9 x engine, TTFT(server) -
TTFT(engine) <= 5 ms. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
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


def offline_run(model: Path, engine: EngineConfig, plan: BenchPlan, vocab: int, tmp: Path) -> dict:
    """`python -m worker.batch` on the plan's requests; wall time from its own report."""
    records, prompts = make_records(plan, vocab)
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    lines = [
        {"prompt_token_ids": p, "max_new_tokens": r.max_new_tokens, "ignore_eos": True}
        for r, p in zip(records, prompts, strict=True)
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["--model", str(model), "--input", str(src), "--output", str(out), "--device", "cpu"]
    args += ["--max-batch-size", str(engine.max_batch_size)]
    args += ["--kv-cache-mb", str(engine.kv_cache_mb)]
    done = subprocess.run(
        [sys.executable, "-m", "worker.batch", *args], capture_output=True, text=True, check=True
    )
    wall = float(done.stderr.rsplit(" requests in ", 1)[1].split(" s,")[0])
    tokens = sum(len(json.loads(line)["token_ids"]) for line in out.read_text().splitlines())
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


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
    ap.add_argument("--prompt-len", default="16:512", help="LOW:HIGH prompt tokens")
    ap.add_argument("--output-len", default="16:256", help="LOW:HIGH new tokens")
    ap.add_argument("--quick", action="store_true", help="small model and workload (smoke test)")
    args = ap.parse_args(argv)
    preset = "default" if args.quick else "smollm2-135m"
    model = args.model or write_checkpoint(default_cache_dir() / f"{preset}-random", preset)
    requests = 16 if args.quick else args.requests
    plan = BenchPlan(
        requests=requests,
        rate=float("inf"),
        prompt_len=LengthDist.parse("16:64" if args.quick else args.prompt_len),
        output_len=LengthDist.parse("8:32" if args.quick else args.output_len),
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

    vocab = load_model_config(model).vocab_size
    local = engine_run(model, engine, plan, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        offline = offline_run(model, engine, plan, vocab, Path(tmp))
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
    offline_ratio = served["tok_s"] / offline["tok_s"]
    extra_ttft = served["ttft_ms"] - local["ttft_ms"]
    rows = [
        (
            "engine (bare BatchProcessor, no front)",
            local["tokens"],
            f"{local['wall_s']:.1f}",
            f"{local['tok_s']:.1f}",
            f"{local['ttft_ms']:.1f}",
        ),
        (
            "offline (python -m worker.batch: front pipeline in process)",
            offline["tokens"],
            f"{offline['wall_s']:.1f}",
            f"{offline['tok_s']:.1f}",
            "-",
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
                "server tok/s / offline tok/s >= 0.9",
                f"{offline_ratio:.3f}",
                "PASS" if offline_ratio >= 0.9 else "MISS",
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
