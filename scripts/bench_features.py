"""Decode-step cost of logprobs and penalties: what a batch pays for what it asks.

    .venv/bin/python scripts/bench_features.py [--device auto|cpu|cuda] [--model DIR]
        [--batch-sizes 1,8,32] [--steps 16] [--rounds 3] [--quick] [--json out.json]

For each batch size, every row decoding (prompts of 64 tokens, 32 of them repeated so
the penalties have counts), one `BatchProcessor.process_step()` is timed in these modes:

- `nobody asks, bypassed`: the runner with `penalize` and `token_logprobs` replaced by
  no-ops, i.e. the step as it was before these features existed: the baseline;
- `nobody asks`: this build, no request asks for logprobs or a penalty. It should equal the
  baseline: both features only run for the rows that use them;
- `all: logprobs, top 20`, `all: penalties`, `half: logprobs top 5 + penalties`.

Modes are interleaved round by round (so machine noise spreads over all of them) and each
cell is the median over all rounds' steps; `vs baseline` divides by the baseline's median.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import Engine, Record, print_records
from bench_engine import default_model

import worker.model_runner as model_runner
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor
from worker.channel.types import SamplingParams
from worker.checkpoint import load_checkpoint

PROMPT_LEN = 64
COLUMNS = (
    "batch=batch:d; mode=mode:; step ms=step_ms:.2f; best ms=best_ms:.2f; vs baseline=ratio:.3f"
)
PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5}
MODES: dict[str, Callable[[int], dict[str, Any]]] = {
    "nobody asks, bypassed": lambda row: {},
    "nobody asks": lambda row: {},
    "all: logprobs, top 20": lambda row: {"logprobs": True, "top_logprobs": 20},
    "all: penalties": lambda row: PENALTIES,
    "half: logprobs top 5 + penalties": lambda row: (
        {"logprobs": True, "top_logprobs": 5, **PENALTIES} if row % 2 else {}
    ),
}
BASELINE = "nobody asks, bypassed"


def bypassed(enabled: bool) -> None:
    """Swap the runner's feature hooks for no-ops (or back): the pre-feature step."""
    if enabled:
        model_runner.penalize = lambda xp, logits, *rest: logits  # type: ignore[assignment]
        model_runner.token_logprobs = lambda xp, logits, params, tokens: [None] * len(params)  # type: ignore[assignment]
    else:
        model_runner.penalize = ORIGINAL["penalize"]  # type: ignore[assignment]
        model_runner.token_logprobs = ORIGINAL["token_logprobs"]  # type: ignore[assignment]


ORIGINAL = {"penalize": model_runner.penalize, "token_logprobs": model_runner.token_logprobs}


def time_mode(
    eng: Engine, proc: BatchProcessor, mode: str, batch: int, steps: int, warmup: int
) -> list[float]:
    rng = np.random.default_rng(batch)
    handles = []
    for row in range(batch):
        half = eng.prompt(rng, PROMPT_LEN // 2)
        params = SamplingParams(
            max_new_tokens=steps + warmup + 4, ignore_eos=True, **MODES[mode](row)
        )
        handle = len(handles) + 10_000 * batch
        proc.add_request(handle, half + half, params)  # a repeated half: penalties bite
        handles.append(handle)
    seen: set[int] = set()
    while len(seen) < batch:  # prefill until every row decodes
        seen.update(r.handle for r in proc.process_step())
    bypassed(mode == BASELINE)
    try:
        for _ in range(warmup):
            proc.process_step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            records = proc.process_step()
            times.append(time.perf_counter() - start)
            assert len(records) == batch, "a row finished or stalled during timing"
    finally:
        bypassed(False)
        for handle in handles:
            proc.cancel(handle)
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", type=Path, default=None, help="default: as bench_engine.py")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=16, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 round: a smoke run")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps, rounds, warmup = (2, 1, 1) if args.quick else (args.steps, args.rounds, 2)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    backend = select_backend(args.device)
    model_dir = args.model or default_model()
    eng = Engine(load_checkpoint(model_dir, backend), backend)
    print(f"# Logprobs and penalties: {model_dir}, {backend.describe()}")
    proc = eng.processor(max(sizes), PROMPT_LEN + steps + warmup + 8, max(sizes) * PROMPT_LEN)
    rows: list[Record] = []
    for batch in sizes:
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode in MODES:
                times[mode] += time_mode(eng, proc, mode, batch, steps, warmup)
        base = float(np.median(times[BASELINE]))
        for mode, seconds in times.items():
            median = float(np.median(seconds))
            rows.append(
                {
                    "batch": batch,
                    "mode": mode,
                    "step_ms": 1e3 * median,
                    "best_ms": 1e3 * min(seconds),
                    "ratio": median / base,
                }
            )
    print_records(
        f"Decode step by what the batch asks for (prompts of {PROMPT_LEN}, median of "
        f"{rounds} x {steps} steps)",
        rows,
        COLUMNS,
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
