"""What batch-invariant mode costs: the default engine and the batch-invariant one, side by side.

    .venv/bin/python scripts/bench_batch_invariant.py [--model PATH] [--rounds 3] [--quick]

Both engines share one loaded checkpoint and are timed in alternation (round
after round, best of each), so load from other work on the machine falls on
both alike. Decode at batch 1 and 16 (best step of 8, after 2 warm-up steps)
and a 512-token prefill in one step; the machine's copy and matmul ceilings
are measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import Engine, machine_facts, measure_ceilings, print_table
from bench_engine import default_model, start_decoding

from worker.backend import select_backend
from worker.channel.types import SamplingParams
from worker.checkpoint import load_checkpoint


def decode_step_s(eng: Engine, batch: int, steps: int) -> float:
    proc = eng.processor(batch, 16 + steps + 12, batch * 16)
    start_decoding(eng, proc, batch, 16, steps + 10)
    for _ in range(2):
        proc.process_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        proc.process_step()
        times.append(time.perf_counter() - start)
    return min(times)


def prefill_s(eng: Engine, tokens: int) -> float:
    proc = eng.processor(1, tokens + 1, tokens)
    prompt = eng.prompt(np.random.default_rng(1), tokens)
    proc.add_request(1, prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while proc.has_work():
        proc.process_step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the real default model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round, short runs (a smoke run)")
    args = ap.parse_args(argv)
    backend = select_backend("cpu")
    model = args.model or default_model()
    checkpoint = load_checkpoint(model, backend)
    engines = {mode: Engine(checkpoint, backend, mode) for mode in (False, True)}
    rounds, steps, prompt = (1, 2, 64) if args.quick else (args.rounds, 8, 512)
    cases = [("decode, batch 1", 1), ("decode, batch 16", 16), (f"prefill, {prompt} tokens", 0)]
    best: dict[tuple[str, bool], float] = {}
    for _ in range(rounds):
        for name, batch in cases:
            for mode, eng in engines.items():
                seconds = decode_step_s(eng, batch, steps) if batch else prefill_s(eng, prompt)
                best[name, mode] = min(best.get((name, mode), float("inf")), seconds)
    ceil = measure_ceilings(backend.xp, args.quick)
    facts = [*machine_facts(backend.xp, backend.describe()), ("model", model.name)]
    facts += [
        ("copy GB/s (read + write)", f"{ceil['copy_gbps']:.1f}"),
        ("matmul GFLOP/s", f"{ceil['matmul_gflops']:.1f}"),
        ("weights read per decode step", f"{engines[False].weight_bytes / 1e6:.0f} MB"),
    ]
    print_table("Machine and ceilings", ["", "value"], facts)
    rows = []
    for name, batch in cases:
        default, invariant = best[name, False], best[name, True]
        tokens = batch or prompt
        rows.append(
            [
                name,
                f"{tokens / default:.1f}",
                f"{tokens / invariant:.1f}",
                f"{100 * (invariant / default - 1):+.0f}%",
                f"{engines[False].weight_bytes / default / 1e9:.1f}" if batch == 1 else "",
            ]
        )
    print_table(
        f"Default vs batch-invariant (best of {rounds} alternating rounds)",
        ["work", "default tok/s", "batch-invariant tok/s", "time cost", "batch-1 weight GB/s"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
