"""Helpers shared by the benchmarks: machine ceilings and facts, markdown tables,
and `Engine`: a loaded checkpoint with its cost model (parameters, bytes, flops).

Ceilings are measured in the same process as the benchmark they qualify, so a
roofline fraction compares like with like (same threads, same load on the box).
Works with NumPy or CuPy (`xp`); threadpoolctl is used only when installed, so
this also runs on a bare CUDA host.
"""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from worker.backend import Backend
from worker.batch_processor import BatchProcessor
from worker.channel.types import EngineConfig
from worker.checkpoint import Checkpoint
from worker.kv_cache import blocks_for
from worker.model_config import kv_bytes_per_token

Record = dict[str, Any]


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


def sync(xp: ModuleType) -> None:
    """Wait for queued device work, so a host timer measures it (no-op on NumPy)."""
    if is_cupy(xp):
        xp.cuda.Device().synchronize()


def best_seconds(xp: ModuleType, fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    sync(xp)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(xp)
        best = min(best, time.perf_counter() - start)
    return best


def copy_gbps(xp: ModuleType, mib: int = 256, repeats: int = 5, threads: int = 1) -> float:
    """Large-array copy bandwidth in GB/s, counting bytes read plus bytes written.

    `threads` > 1 (NumPy only) copies contiguous slices in parallel: one core
    rarely saturates memory, and BLAS reads the weights with every core.
    """
    n = mib * 2**20 // 4
    src = xp.ones(n, dtype=np.float32)  # written once: pages are touched before timing
    dst = xp.zeros(n, dtype=np.float32)
    dst += 1  # zeros may be lazily mapped; touch every page
    if threads <= 1 or is_cupy(xp):
        seconds = best_seconds(xp, lambda: xp.copyto(dst, src), repeats)
    else:
        edges = np.linspace(0, n, threads + 1).astype(int)
        parts = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(edges)]
        with ThreadPoolExecutor(threads) as pool:  # np.copyto releases the GIL

            def copy() -> None:
                list(pool.map(lambda pair: np.copyto(*pair), parts))

            seconds = best_seconds(xp, copy, repeats)
    return 2 * src.nbytes / seconds / 1e9


def matmul_gflops(xp: ModuleType, n: int = 2048, repeats: int = 5) -> float:
    """Square float32 matmul throughput in GFLOP/s (2 n^3 flops per product)."""
    a = (xp.arange(n * n, dtype=np.float32) % 7).reshape(n, n)  # cheap, deterministic fill
    b = a.T.copy()
    seconds = best_seconds(xp, lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info() -> str:
    """BLAS library and thread count as threadpoolctl sees it (when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return "none found"
    return "; ".join(
        f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, "
        f"{p.get('num_threads')} threads)"
        for p in pools
    )


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_facts(xp: ModuleType, device: str) -> list[tuple[str, str]]:
    """(name, value) rows describing the host and, on CUDA, the GPU."""
    facts = [
        ("CPU", cpu_model()),
        ("cores (os.cpu_count)", str(os.cpu_count())),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("BLAS", blas_info()),
        ("device", device),
        ("load average 1/5/15 min (other work skews timings)", load_average()),
    ]
    if is_cupy(xp):
        runtime = xp.cuda.runtime.runtimeGetVersion()
        facts += [
            ("cupy", xp.__version__),
            ("CUDA runtime", f"{runtime // 1000}.{runtime % 1000 // 10}"),
        ]
    return facts


def measure_ceilings(xp: ModuleType, quick: bool = False) -> dict[str, float]:
    """Copy bandwidth and matmul throughput of this device, measured now."""
    gpu = is_cupy(xp)
    mib = 1024 if gpu else 256  # a GPU copies 256 MiB in ~0.1 ms: too short to time well
    n = 8192 if gpu else 2048
    repeats = 3 if quick else 5
    threads = 1 if gpu else os.cpu_count() or 1
    return {
        "copy_mib": mib,
        "copy_gbps": max(copy_gbps(xp, mib, repeats), copy_gbps(xp, mib, repeats, threads)),
        "matmul_n": n,
        "matmul_gflops": matmul_gflops(xp, n, repeats),
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers should be formatted by the caller."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n### {title}\n\n{md_table(headers, rows)}", flush=True)


def print_records(title: str, records: Sequence[Mapping[str, Any]], columns: str) -> None:
    """One row per record. `columns` is "header=key:spec; ..." and a cell is
    `format(record[key], spec)`, e.g. "tok/s=tok_s:.1f; share=frac:.0%; name=name:"."""
    cols = []
    for item in columns.split(";"):
        head_key, _, spec = item.strip().rpartition(":")
        head, _, key = head_key.partition("=")
        cols.append((head, key, spec))
    rows = [[format(r[key], spec) for _, key, spec in cols] for r in records]
    print_table(title, [head for head, _, _ in cols], rows)


class Engine:
    """One loaded checkpoint, its cost model, and processors that share its weights."""

    def __init__(
        self, checkpoint: Checkpoint, backend: Backend, batch_invariant: bool = False
    ) -> None:
        self.checkpoint, self.backend = checkpoint, backend
        self.batch_invariant = batch_invariant
        w, cfg = checkpoint.weights, checkpoint.config
        self.cfg = cfg
        groups = ("qkv", "o", "gate_up", "down")
        self.matmuls = {k: [getattr(layer, k) for layer in w.layers] for k in groups}
        self.matmuls["lm_head"] = [w.lm_head]
        # Stored (in, out), multiplied as x @ W, or (out, in), as x @ W.T? qkv and the head
        # are never square, and the layers share one layout.
        layers_in_out = w.layers[0].qkv.shape[0] == cfg.hidden_size
        self.in_out = {k: layers_in_out for k in groups}
        self.in_out["lm_head"] = w.lm_head.shape[0] == cfg.hidden_size
        self.linear_params = sum(m.size for k in groups for m in self.matmuls[k])
        layer_arrays = [a for layer in w.layers for a in vars(layer).values() if a is not None]
        # A decode step reads every weight once except the embedding (only B rows of it).
        read = sum(a.size for a in layer_arrays) + w.final_norm.size + w.lm_head.size
        self.weight_bytes = 4 * int(read)  # fp32
        # Model size; a tied embedding is the head (even if the loader keeps a transposed copy).
        self.params = int(read + (0 if cfg.tie_word_embeddings else w.embed.size))

    def processor(self, max_batch: int, seq_tokens: int, budget: int) -> BatchProcessor:
        """A processor whose KV pool holds `max_batch` sequences of `seq_tokens` (no preemption)."""
        bs = 16
        blocks = max_batch * (blocks_for(seq_tokens, bs) + 1)
        mb = blocks * bs * kv_bytes_per_token(self.cfg) * 1.05 / 2**20 + 1  # + admission watermark
        config = EngineConfig(
            max_batch_size=max_batch,
            kv_cache_mb=mb,
            block_size=bs,
            prefill_token_budget=budget,
            device=self.backend.device,
            batch_invariant=self.batch_invariant,
        )
        return BatchProcessor(self.checkpoint, config, self.backend)

    def flops(self, tokens: int, logits_rows: int, attn_pairs: int) -> float:
        """One step: 2 x weights x tokens, the sampled rows' lm_head, and QK^T + PV over
        `attn_pairs` (query, visible key) pairs."""
        cfg = self.cfg
        attn = 4 * cfg.num_heads * cfg.head_dim * attn_pairs * cfg.num_layers
        return (
            2.0 * (self.linear_params * tokens + self.matmuls["lm_head"][0].size * logits_rows)
            + attn
        )

    def prompt(self, rng: np.random.Generator, length: int) -> list[int]:
        return rng.integers(0, self.cfg.vocab_size, size=length).tolist()


def matmul_breakdown(eng: Engine, batch: int, step_s: float) -> list[Record]:
    """Time each weight group's matmul as the model runs it, over every layer (so weights
    stream from memory as in a real step), at `batch` rows; `share`: of a measured step."""
    xp, rows = eng.backend.xp, []
    for name, mats in eng.matmuls.items():
        in_f, out_f = mats[0].shape if eng.in_out[name] else mats[0].shape[::-1]
        x = xp.ones((batch, in_f), dtype=np.float32)  # (B, in)
        if eng.in_out[name]:
            s = best_seconds(xp, lambda x=x, mats=mats: [x @ m for m in mats], 3)
        else:
            s = best_seconds(xp, lambda x=x, mats=mats: [x @ m.T for m in mats], 3)
        flops = 2 * batch * sum(m.size for m in mats)
        label = f"{name} ({in_f} -> {out_f}) x {len(mats)}"
        rows.append(
            {"weight": label, "ms": 1e3 * s, "gflops": flops / s / 1e9, "share": s / step_s}
        )
    total = sum(r["ms"] for r in rows) / 1e3
    rows.append(
        {"weight": "all", "ms": 1e3 * total, "gflops": float("nan"), "share": total / step_s}
    )
    return rows
