"""Engine benchmark: machine ceilings, decode scaling, prefill, continuous vs static batching.

    .venv/bin/python scripts/bench_engine.py [--device auto|cpu|cuda] [--model DIR] [--quick]
        [--batch-sizes 1,2,4,8,16,32,64] [--json out.json] [--profile] [--batch-invariant]

Every timed step is one `BatchProcessor.process_step()`, i.e. what the server
runs: scheduling, host-side batch layout, the forward pass and sampling (the
sampled tokens come back to the host, so a CUDA step is synchronised).
Roofline fractions compare against ceilings measured in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import fetch_model
import numpy as np
from bench_common import (
    Engine,
    Record,
    best_seconds,
    machine_facts,
    matmul_breakdown,
    measure_ceilings,
    print_records,
    print_table,
)

from worker.backend import select_backend
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import SamplingParams
from worker.checkpoint import load_checkpoint
from worker.random_checkpoint import default_cache_dir, write_checkpoint

# Table layouts: "header=record key:format spec; ..."
DECODE_COLUMNS = (
    "batch=batch:d; tok/s=tok_s:.1f; step ms=step_ms:.1f; best ms=best_ms:.1f; "
    "speed-up vs batch 1=speedup:.2f; "
    "of copy GB/s (weights)=mem_frac:.0%; GFLOP/s=gflops:.1f; of matmul GFLOP/s=flop_frac:.0%"
)
PREFILL_COLUMNS = (
    "prompts x tokens=shape:; steps=steps:d; seconds=seconds:.3f; tok/s=tok_s:.0f; "
    "GFLOP/s=gflops:.1f; of matmul GFLOP/s=flop_frac:.0%"
)
BATCHING_COLUMNS = (
    "mode=mode:; output tokens=tokens:d; steps=steps:d; wall s=s:.1f; tok/s=tok_s:.1f"
)
MATMUL_COLUMNS = "weight=weight:; ms per step=ms:.2f; GFLOP/s=gflops:.1f; of step time=share:.0%"


@dataclass(frozen=True)
class Plan:
    """Sizes of every section, resolved from the flags (`--quick` shrinks them)."""

    batch_sizes: list[int]
    prompt_len: int = 16
    warmup_steps: int = 3
    decode_steps: int = 16
    prefill_shapes: tuple[tuple[int, int], ...] = ((1, 512), (8, 256))  # (prompts, tokens each)
    num_requests: int = 64
    prompt_range: tuple[int, int] = (16, 64)
    output_range: tuple[int, int] = (16, 256)
    max_batch: int = 8


def make_plan(args: argparse.Namespace) -> Plan:
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    if args.quick:
        return Plan(
            sizes or [1, 4, 32],
            warmup_steps=1,
            decode_steps=4,
            prefill_shapes=((1, 128), (4, 64)),
            num_requests=args.requests or 16,
            prompt_range=(8, 32),
            output_range=(8, 64),
            max_batch=args.max_batch or 8,
        )
    default_sizes = [1, 2, 4, 8, 16, 32, 64]
    return Plan(
        sizes or default_sizes, num_requests=args.requests or 64, max_batch=args.max_batch or 8
    )


def start_decoding(
    eng: Engine, proc: BatchProcessor, batch: int, prompt_len: int, max_new: int
) -> list[int]:
    """Queue `batch` requests and step until every one has its first token (all decoding)."""
    rng = np.random.default_rng(batch)
    handles = [batch * 1000 + i for i in range(batch)]
    for handle in handles:
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
        proc.add_request(handle, eng.prompt(rng, prompt_len), params)
    seen: set[int] = set()
    while len(seen) < batch:
        seen.update(r.handle for r in proc.process_step())
    if proc.get_stats().running != batch:
        raise RuntimeError(f"batch {batch} did not all run at once: processor too small")
    return handles


def bench_decode(eng: Engine, plan: Plan, ceil: Record) -> list[Record]:
    steps, top = plan.warmup_steps + plan.decode_steps, max(plan.batch_sizes)
    proc = eng.processor(top, plan.prompt_len + steps + 2, top * plan.prompt_len)
    rows: list[Record] = []
    for batch in plan.batch_sizes:
        handles = start_decoding(eng, proc, batch, plan.prompt_len, steps + 2)
        for _ in range(plan.warmup_steps):
            proc.process_step()
        times = []
        for _ in range(plan.decode_steps):
            start = time.perf_counter()
            records = proc.process_step()
            times.append(time.perf_counter() - start)
            assert len(records) == batch, "a sequence finished or stalled during timing"
        for handle in handles:
            proc.cancel(handle)
        step_s = float(np.median(times))
        keys = plan.prompt_len + plan.warmup_steps + (plan.decode_steps - 1) / 2 + 1  # mean
        flops = eng.flops(batch, batch, int(batch * keys))
        rows.append(
            {
                "batch": batch,
                "tok_s": batch / step_s,
                "step_ms": 1e3 * step_s,
                "best_ms": 1e3 * min(times),  # least disturbed by other work on the machine
                "mem_frac": eng.weight_bytes / step_s / (ceil["copy_gbps"] * 1e9),
                "gflops": flops / step_s / 1e9,
                "flop_frac": flops / step_s / (ceil["matmul_gflops"] * 1e9),
            }
        )
    base = next((r["tok_s"] for r in rows if r["batch"] == 1), rows[0]["tok_s"])
    for r in rows:
        r["speedup"] = r["tok_s"] / base
    return rows


def bench_prefill(eng: Engine, plan: Plan, ceil: Record) -> list[Record]:
    rows: list[Record] = []
    rng = np.random.default_rng(1)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for n, length in plan.prefill_shapes:
        proc = eng.processor(n, length + 1, n * length)  # the whole batch prefills in one step
        for attempt in range(2):  # warm-up, then timed
            for i in range(n):
                proc.add_request(attempt * n + i, eng.prompt(rng, length), params)
            start, steps = time.perf_counter(), 0
            while proc.has_work():
                proc.process_step()
                steps += 1
            seconds = time.perf_counter() - start
        flops = eng.flops(n * length, n, n * length * (length + 1) // 2)
        rows.append(
            {
                "shape": f"{n} x {length}",
                "steps": steps,
                "seconds": seconds,
                "tok_s": n * length / seconds,
                "gflops": flops / seconds / 1e9,
                "flop_frac": flops / seconds / (ceil["matmul_gflops"] * 1e9),
            }
        )
    return rows


def bench_batching(eng: Engine, plan: Plan) -> Record:
    """Continuous (refill a slot as soon as it frees) vs static (a batch runs until its
    longest member has finished, then the next batch starts), same requests and processor."""
    rng = np.random.default_rng(2024)
    (p_lo, p_hi), (o_lo, o_hi) = plan.prompt_range, plan.output_range
    requests = [
        Request(
            f"r{i}",
            eng.prompt(rng, int(rng.integers(p_lo, p_hi + 1))),
            SamplingParams(max_new_tokens=int(rng.integers(o_lo, o_hi + 1)), ignore_eos=True),
        )
        for i in range(plan.num_requests)
    ]
    proc = eng.processor(plan.max_batch, p_hi + o_hi, 512)
    continuous_steps: list[int] = []
    start = time.perf_counter()
    done = run_to_completion(proc, requests, on_records=lambda ev: continuous_steps.append(len(ev)))
    continuous_s = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done.values())

    # Static batching as padded batch generation does it: every member of a batch keeps
    # computing until its longest member is done; only tokens a request asked for count.
    start, static_tokens, static_steps = time.perf_counter(), 0, 0
    for first in range(0, len(requests), plan.max_batch):
        batch = requests[first : first + plan.max_batch]
        longest = max(r.params.max_new_tokens for r in batch)
        wanted = [r.params.max_new_tokens for r in batch]
        for handle, r in enumerate(batch):
            proc.add_request(handle, r.prompt_ids, replace(r.params, max_new_tokens=longest))
        while proc.has_work():
            records = proc.process_step()
            static_tokens += sum(r.index < wanted[r.handle] for r in records)
            static_steps += 1
    static_s = time.perf_counter() - start
    assert static_tokens == tokens, (static_tokens, tokens)
    return {
        "requests": len(requests),
        "max_batch": plan.max_batch,
        "tokens": tokens,
        "continuous_s": continuous_s,
        "static_s": static_s,
        "continuous_steps": len(continuous_steps),
        "static_steps": static_steps,
        "ratio": static_s / continuous_s,
        # The ratio if a step cost the same whatever its batch (the GPU-like limit).
        "step_ratio": static_steps / len(continuous_steps),
    }


def targets(decode: list[Record], batching: Record | None) -> list[Record]:
    """The engine's targets, PASS/MISS with the margin over the required value."""
    by_batch = {r["batch"]: r for r in decode}
    scaling = by_batch[32]["speedup"] if 1 in by_batch and 32 in by_batch else None
    checks = [
        ("batch-32 decode tok/s / batch-1", scaling, 12.0),
        ("batch-1 decode tok/s", by_batch[1]["tok_s"] if 1 in by_batch else None, 50.0),
        ("continuous / static tok/s", batching["ratio"] if batching else None, 1.8),
    ]
    return [
        {
            "target": name,
            "measured": "n/a" if value is None else f"{value:.2f}",
            "required": f">= {goal:g}",
            "result": "n/a" if value is None else ("PASS" if value >= goal else "MISS"),
            "margin": "" if value is None else f"{100 * (value / goal - 1):+.0f}%",
        }
        for name, value, goal in checks
    ]


def profile_decode(eng: Engine, plan: Plan) -> None:
    """Where a decode step's time goes at batch 1 and 32: cProfile, then the matmuls alone
    (cProfile books `@` to its caller, so `forward`'s own time is mostly matmuls)."""
    xp = eng.backend.xp
    for batch in (1, 32):
        proc = eng.processor(batch, plan.prompt_len + 12, batch * plan.prompt_len)
        start_decoding(eng, proc, batch, plan.prompt_len, 10)
        step_s = best_seconds(xp, proc.process_step, 2)
        prof = cProfile.Profile()
        prof.runcall(lambda p=proc: [p.process_step() for _ in range(5)])
        for key in ("cumulative", "tottime"):
            print(f"\n### cProfile: batch {batch}, 5 decode steps, top 25 by {key}\n\n```")
            pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(25)
            print("```")
        rows = matmul_breakdown(eng, batch, step_s)
        print_records(
            f"Matmuls alone (x @ W as the engine stores W), batch {batch}, "
            f"step {1e3 * step_s:.1f} ms",
            rows,
            MATMUL_COLUMNS,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="default: the real default model (make model's GGUF, dequantized to fp32 at "
        "load); a random checkpoint of the same shape when it cannot be fetched",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated; default 1,2,...,64")
    ap.add_argument("--requests", type=int, default=None, help="continuous vs static: requests")
    ap.add_argument("--max-batch", type=int, default=None, help="continuous vs static: slots")
    ap.add_argument("--skip-batching", action="store_true", help="skip continuous vs static")
    ap.add_argument("--profile", action="store_true", help="also profile batch-1/32 decode")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--batch-invariant", action="store_true", help="the batch-invariant engine")
    return ap.parse_args(argv)


def default_model() -> Path:
    """The GGUF `make model` fetches; offline, a random checkpoint of its shape (same speed)."""
    try:
        return fetch_model.fetch_gguf(log=lambda line: print(line, file=sys.stderr))
    except fetch_model.FetchError as err:
        print(f"# real model unavailable ({err}); using random weights", file=sys.stderr)
        return write_checkpoint(default_cache_dir() / "smollm2-135m-random", "smollm2-135m")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    backend = select_backend(args.device)
    model_dir = args.model or default_model()
    eng = Engine(load_checkpoint(model_dir, backend), backend, args.batch_invariant)
    mode = ", batch-invariant" if args.batch_invariant else ""
    print(
        f"# Engine benchmark: {model_dir} ({eng.params / 1e6:.1f}M params), "
        f"{backend.describe()}{mode}"
    )

    ceil = measure_ceilings(backend.xp, args.quick)
    facts = [
        *machine_facts(backend.xp, backend.describe()),
        (f"copy GB/s ({ceil['copy_mib']} MiB f32, read + write)", f"{ceil['copy_gbps']:.1f}"),
        (f"matmul GFLOP/s ({ceil['matmul_n']}^2 f32)", f"{ceil['matmul_gflops']:.1f}"),
        ("weights read per decode step (f32)", f"{eng.weight_bytes / 1e6:.0f} MB"),
    ]
    print_table("Machine and ceilings", ["", "value"], facts)

    decode = bench_decode(eng, plan, ceil)
    print_records(
        f"Decode scaling (prompts of {plan.prompt_len}, median of {plan.decode_steps} steps)",
        decode,
        DECODE_COLUMNS,
    )
    prefill = bench_prefill(eng, plan, ceil)
    print_records(
        "Prefill (whole batch in one step; after a warm-up run of the same shape)",
        prefill,
        PREFILL_COLUMNS,
    )
    batching = None if args.skip_batching else bench_batching(eng, plan)
    if batching:
        b = batching
        modes = [
            {"mode": m, "tokens": b["tokens"], "steps": b[f"{m}_steps"], "s": b[f"{m}_s"]}
            for m in ("continuous", "static")
        ]
        print_records(
            f"Continuous vs static batching ({b['requests']} requests, {b['max_batch']} slots, "
            f"prompts {plan.prompt_range}, outputs {plan.output_range} tokens): "
            f"continuous / static = {b['ratio']:.2f}x (in steps: {b['step_ratio']:.2f}x)",
            [{**m, "tok_s": m["tokens"] / m["s"]} for m in modes],
            BATCHING_COLUMNS,
        )
    summary = targets(decode, batching)
    print_records("Targets", summary, "; ".join(f"{k}={k}:" for k in summary[0]))
    if args.profile:
        profile_decode(eng, plan)
    if args.json:
        results = dict(plan=asdict(plan), facts=dict(facts), ceilings=ceil, decode=decode)
        results |= dict(prefill=prefill, batching=batching, targets=summary)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
