"""shoal's engine beside Hugging Face transformers on the same checkpoint and work.

    .venv/bin/pip install -e '.[bench-peers]'     # torch==2.13.0 + transformers, bench only
    .venv/bin/python scripts/bench_peers.py [--model DIR] [--quick]

Tables:
1. the seed's table for both: batch 1, 2, 4, 8, 16 of equal work (16-token prompts,
   64 new tokens each) -> tok/s, efficiency (tok/s over batch x batch-1 tok/s), latency;
2. a mixed workload (prompt and output lengths drawn per request): transformers one
   request at a time and in padded static batches of 16 and 32, shoal continuous;
   shoal's tok/s over each.
Both sides run greedy decoding in float32 on the CPU with every core; transformers
is forced to generate the full length (min_new_tokens) as shoal does with ignore_eos.
torch is never a runtime or test dependency of shoal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from bench_common import measure_ceilings, print_table
from transformers import AutoModelForCausalLM

from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.random_checkpoint import default_cache_dir, write_checkpoint


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one padded batch (left padding) generating exactly `new_tokens` each."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def shoal_run(model_dir: Path, requests: list[Request], slots: int) -> float:
    processor = BatchProcessor.from_model_dir(
        model_dir, EngineConfig(max_batch_size=slots, kv_cache_mb=1536, device="cpu")
    )
    run_to_completion(processor, requests[:1])  # warm-up
    start = time.perf_counter()
    run_to_completion(processor, requests)
    return time.perf_counter() - start


def seed_table(
    model_dir: Path, hf: torch.nn.Module, sizes: list[int], new: int, vocab: int
) -> None:
    rng = np.random.default_rng(0)
    rows, base = [], {}
    for b in sizes:
        prompts = [rng.integers(1, vocab, size=16).tolist() for _ in range(b)]
        hf_s = hf_generate(hf, prompts, new)
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        shoal_s = shoal_run(
            model_dir, [Request(str(i), p, params) for i, p in enumerate(prompts)], b
        )
        for name, secs in (("transformers", hf_s), ("shoal", shoal_s)):
            tok_s = b * new / secs
            base.setdefault(name, tok_s)
            rows.append((name, b, f"{tok_s:.1f}", f"{tok_s / (b * base[name]):.0%}", f"{secs:.2f}"))
    rows.sort(key=lambda r: (r[0], r[1]))
    print_table(
        f"Equal work: 16-token prompts, {new} new tokens each (the seed's table)",
        ["engine", "batch", "tok/s", "efficiency", "latency s"],
        rows,
    )


def mixed_table(model_dir: Path, hf: torch.nn.Module, n: int, out_hi: int, vocab: int) -> None:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, vocab, size=int(rng.integers(16, 129))).tolist() for _ in range(n)]
    outputs = [int(rng.integers(16, out_hi + 1)) for _ in range(n)]
    useful = sum(outputs)
    times = {
        "transformers, one at a time": sum(
            hf_generate(hf, [p], o) for p, o in zip(prompts, outputs, strict=True)
        )
    }
    for size in (16, 32):
        total = 0.0
        for first in range(0, n, size):
            total += hf_generate(
                hf, prompts[first : first + size], max(outputs[first : first + size])
            )
        times[f"transformers, static batches of {size}"] = total
    requests = [
        Request(str(i), p, SamplingParams(max_new_tokens=o, ignore_eos=True))
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    shoal_s = shoal_run(model_dir, requests, 32)
    rows = [
        (name, f"{secs:.1f}", f"{useful / secs:.1f}", f"{secs / shoal_s:.2f}x")
        for name, secs in times.items()
    ]
    rows.append(
        ("shoal, continuous (32 slots)", f"{shoal_s:.1f}", f"{useful / shoal_s:.1f}", "1.00x")
    )
    print_table(
        f"Mixed work: {n} requests, prompts 16-128, outputs 16-{out_hi} ({useful} useful tokens)",
        ["engine", "seconds", "useful tok/s", "shoal speed-up"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-sizes", help="equal-work batch sizes, e.g. 1,2,4,8,16,32")
    ap.add_argument("--skip-mixed", action="store_true", help="only the equal-work table")
    args = ap.parse_args(argv)
    preset = "default" if args.quick else "smollm2-135m"
    model_dir = args.model or write_checkpoint(default_cache_dir() / f"{preset}-random", preset)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    ceilings = measure_ceilings(np, quick=args.quick)
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    print(f"# shoal vs {versions}\nmodel {model_dir}")
    print(
        f"copy {ceilings['copy_gbps']:.1f} GB/s, matmul {ceilings['matmul_gflops']:.1f} GFLOP/s\n"
    )
    hf_generate(hf, [[1, 2, 3]], 4)  # warm-up: the first generate call pays one-off costs
    sizes = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16, 32]
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    seed_table(model_dir, hf, sizes, 8 if args.quick else 64, vocab)
    if not args.skip_mixed:
        mixed_table(model_dir, hf, 8 if args.quick else 64, 32 if args.quick else 128, vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
