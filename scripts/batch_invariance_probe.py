"""Which operations change a row's bits when other rows share the call? (docs/batch-invariance.md)

    .venv/bin/python scripts/batch_invariance_probe.py [--model PATH] [--quick]

For each operation of a forward step, the same row is computed alone and
inside calls with other rows (other row counts, other places, decode vs
prefill chunks, other chunk boundaries), once as the default engine does it
and once in batch-invariant mode. A row "differs" when any of its float32
bits do. The last table runs the whole engine: one request's logits alone
and inside a batch of 8 requests in mixed phases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fetch_model
import numpy as np
from bench_common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # as bench_sweep does
from engine_probe import record_logits

from worker.attention import TILE_TOKENS, paged_attention
from worker.backend import select_backend
from worker.batch_processor import BatchProcessor
from worker.channel.types import EngineConfig, SamplingParams
from worker.checkpoint import load_checkpoint
from worker.matmul import matmul, weight_min_rows
from worker.model import rms_norm, silu
from worker.random_checkpoint import default_cache_dir, write_checkpoint
from worker.sampling import filtered_probs

ROW_COUNTS = [1, 2, 3, 4, 5, 8, 16, 17, 28, 32, 64, 128, 256]


def differing(reference: np.ndarray, rows: list[np.ndarray]) -> str:
    """'k of n' calls whose row differs from the reference, and the largest difference."""
    bad = [r for r in rows if not np.array_equal(r, reference)]
    worst = max((float(np.abs(r - reference).max()) for r in bad), default=0.0)
    return f"{len(bad)} of {len(rows)}" + (f" (max {worst:.1e})" if bad else "")


def probe_matmul(shapes: dict[str, tuple[int, int]]) -> list[list[str]]:
    rng = np.random.default_rng(0)
    out = []
    for name, (k, n) in shapes.items():
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.05
        x = rng.standard_normal((max(ROW_COUNTS), k), dtype=np.float32)
        cells = [f"{name} ({k} x {n})"]
        for min_rows in (1, weight_min_rows((k, n))):
            reference = matmul(np, x[:64], w, min_rows)[0]  # row 0 inside 64 rows
            rows = [matmul(np, x[:m], w, min_rows)[0] for m in ROW_COUNTS]
            cells.append(differing(reference, rows))
        out.append(cells)
    return out


def probe_attention(heads: int, kv_heads: int, head_dim: int) -> list[list[str]]:
    """Query 299 of a 300-token sequence: alone, beside longer sequences, in prefill chunks."""
    rng = np.random.default_rng(1)
    block, length = 16, 300
    pool_shape = (80, block, kv_heads, head_dim)
    k_pool = rng.standard_normal(pool_shape, dtype=np.float32)
    v_pool = rng.standard_normal(pool_shape, dtype=np.float32)
    q = rng.standard_normal((length, heads, head_dim), dtype=np.float32)
    table = np.arange(19)  # 300 tokens in 19 blocks
    scale = head_dim**-0.5
    results = []
    for invariant in (False, True):

        def attend(qs, tables, positions, blocks, invariant=invariant):  # type: ignore[no-untyped-def]
            return paged_attention(
                np, qs, k_pool, v_pool, tables, positions, blocks, scale, None,
                TILE_TOKENS, invariant,
            )  # fmt: skip

        last = length - 1
        alone = attend(q[None, last:], table[None], np.array([[last]]), 19)[0, 0]
        rows = []
        for others in (1, 7):  # a decode beside longer sequences (up to 79 blocks)
            tables = np.zeros((others + 1, 79), dtype=np.int64)
            tables[0, :19] = table
            tables[1:] = np.arange(79)
            positions = np.array([[last]] + [[1000 + i] for i in range(others)])
            rows.append(
                attend(np.repeat(q[None, last:], others + 1, 0), tables, positions, 79)[0, 0]
            )
        for chunk in (2, 16, 100, 300):  # the last row of a prefill chunk
            start = length - chunk
            pos = np.arange(start, length)[None]
            rows.append(attend(q[None, start:], table[None], pos, 19)[0, -1])
        results.append(differing(alone, rows))
    return [[f"attention, {heads}/{kv_heads} heads, D={head_dim}", *results]]


def probe_rowwise(hidden: int, vocab: int) -> list[list[str]]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, hidden), dtype=np.float32)
    weight = rng.standard_normal(hidden, dtype=np.float32)
    out = []
    for name, f in (
        ("rms_norm", lambda a: rms_norm(np, a, weight, 1e-5)),
        ("silu", lambda a: silu(np, a)),
    ):
        cell = differing(f(x[:1])[0], [f(x[:m])[0] for m in (2, 5, 64)])
        out.append([name, cell, cell])
    logits = rng.standard_normal((16, vocab), dtype=np.float32) * 4

    def probs(m: int) -> np.ndarray:  # row 0's kept probabilities among m rows
        t, p = np.full(m, 0.8, np.float32), np.full(m, 0.9, np.float32)
        k, min_p = np.zeros(m, np.int64), np.zeros(m, np.float32)
        _, kept = filtered_probs(np, logits[:m], t, k, p, min_p)
        return kept[0]

    cell = differing(probs(1), [probs(m) for m in (2, 7, 16)])
    out.append(["sampling filters (temperature, top-p)", cell, cell])
    return out


def target_logits(proc: BatchProcessor, target: list[int], others: list[list[int]]) -> dict:
    """Token index -> the logits request 0 sampled it from; `others` join at step 2."""
    recorded = record_logits(proc)
    proc.add_request(0, target, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for step in range(1000):
        if step == 2:  # they prefill (in chunks) while the target decodes
            for i, ids in enumerate(others, start=1):
                proc.add_request(i, ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
        proc.process_step()
        if not proc.has_work():
            break
    return recorded[0]


def probe_engine(model: Path) -> list[list[str]]:
    backend = select_backend("cpu")
    checkpoint = load_checkpoint(model, backend)
    rng = np.random.default_rng(3)
    vocab = checkpoint.config.vocab_size
    target = rng.integers(1, vocab, 24).tolist()
    others = [rng.integers(1, vocab, int(n)).tolist() for n in rng.integers(2, 60, 8)]
    cells = []
    for invariant in (False, True):
        config = EngineConfig(
            max_batch_size=16, kv_cache_mb=64, prefill_token_budget=48, device="cpu",
            batch_invariant=invariant,
        )  # fmt: skip
        alone = target_logits(BatchProcessor(checkpoint, config, backend), target, [])
        batched = target_logits(BatchProcessor(checkpoint, config, backend), target, others)
        same = sum(np.array_equal(alone[i], batched[i]) for i in alone)
        diff = max(float(np.abs(alone[i] - batched[i]).max()) for i in alone)
        cells.append(
            f"{len(alone) - same} of {len(alone)} tokens" + (f" (max {diff:.1e})" if diff else "")
        )
    return [[f"whole engine: a request alone vs beside 8 ({model.name})", *cells]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the real default model")
    ap.add_argument("--quick", action="store_true", help="skip the whole-engine run")
    args = ap.parse_args(argv)
    shapes = {  # SmolLM2-135M's products: (in, out)
        "qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
        "lm_head": (576, 49152),
    }  # fmt: skip
    header = ["operation", "default engine: calls where the row differs", "batch-invariant"]
    rows = probe_matmul(shapes)
    rows += probe_attention(9, 3, 64) + probe_attention(4, 4, 64)
    rows += probe_rowwise(576, 49152)
    if not args.quick:
        model = args.model
        if model is None:
            try:
                model = fetch_model.fetch_gguf(log=lambda line: print(line, file=sys.stderr))
            except fetch_model.FetchError:
                model = write_checkpoint(
                    default_cache_dir() / "smollm2-135m-random", "smollm2-135m"
                )
        rows += probe_engine(model)
    print_table(
        f"Row bits alone vs with other rows (matmul rows {ROW_COUNTS}; attention: a decode "
        "beside 1 or 7 longer sequences, the last row of prefill chunks of 2/16/100/300)",
        header,
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
