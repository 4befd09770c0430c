"""Request rate swept from light load to saturation, and the batching window's effect.

    .venv/bin/python scripts/bench_sweep.py [--rates 0.25,0.5,1,2,4,inf] [--requests 60]
        [--windows 0,5,20] [--window-rate 1] [--quick] [--model DIR]

For each rate: throughput and p50 / p99 TTFT and TPOT (the load generator's
Poisson arrivals). Then, at one moderate rate, the server restarted with each
`--batch-timeout-ms` value: the latency / throughput trade-off of the batching
window, measured instead of assumed. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_common import measure_ceilings, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_harness import start_server

from client.aio import AsyncShoalClient
from client.bench import BenchPlan, LengthDist, run_bench, summarize
from worker.random_checkpoint import default_cache_dir, write_checkpoint


async def one_run(target: str, plan: BenchPlan) -> dict:
    async with AsyncShoalClient(target) as client:
        records, wall = await run_bench(client, plan)
    return summarize(records, wall)


def row(label: str, s: dict) -> tuple:
    return (
        label,
        f"{s['request_throughput']:.2f}",
        f"{s['output_tokens_per_s']:.1f}",
        f"{s['ttft_ms']['p50']:.0f}",
        f"{s['ttft_ms']['p99']:.0f}",
        f"{s['tpot_ms']['p50']:.1f}",
        f"{s['tpot_ms']['p99']:.1f}",
        sum(s["errors"].values()),
    )


HEADERS = [
    "",
    "req/s",
    "output tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "errors",
]


def serve(model: Path, tmp: str, window_ms: float, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return start_server(
        model,
        Path(tmp) / f"server-{window_ms}.log",
        "--workers",
        "1",
        "--max-batch-size",
        str(args.max_batch_size),
        "--kv-cache-mb",
        "1536",
        "--batch-timeout-ms",
        str(window_ms),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rates", default="0.25,0.5,1,2,4,inf")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--windows", default="0,5,20")
    ap.add_argument("--window-rate", type=float, default=1.0)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    preset = "default" if args.quick else "smollm2-135m"
    model = args.model or write_checkpoint(default_cache_dir() / f"{preset}-random", preset)
    out_hi = 32 if args.quick else 256

    def plan(rate: float) -> BenchPlan:
        return BenchPlan(args.requests, rate, LengthDist(16, 128), LengthDist(16, out_hi), seed=7)

    ceilings = measure_ceilings(np, quick=args.quick)
    print(f"# Rate sweep: {model}, {args.requests} requests per point, cpu")
    print(
        f"copy {ceilings['copy_gbps']:.1f} GB/s, matmul {ceilings['matmul_gflops']:.1f} GFLOP/s\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(model, tmp, 5.0, args)
        try:
            rows = [
                row(f"rate {r}/s", asyncio.run(one_run(server.target, plan(float(r)))))
                for r in args.rates.split(",")
            ]
        finally:
            server.stop()
        print_table("Throughput and latency by request rate (window 5 ms)", HEADERS, rows)

        rows = []
        for window in (float(w) for w in args.windows.split(",")):
            server = serve(model, tmp, window, args)
            try:
                summary = asyncio.run(one_run(server.target, plan(args.window_rate)))
            finally:
                server.stop()
            rows.append(row(f"window {window:g} ms", summary))
        print_table(f"Batching window at {args.window_rate}/s", HEADERS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
