"""GPU check: every kernel on CuPy against NumPy, then the engine benchmark on the GPU.

    PYTHONPATH=. python3 scripts/gpu_check.py [--xp cupy|numpy] [--skip-bench] [--bench-quick]

Each kernel runs on the same random inputs with xp=numpy (the reference) and
xp=cupy; then the whole engine runs a few prompts with device=cpu and
device=cuda and their logits and tokens are compared. `--xp numpy` compares
NumPy with NumPy: a dry run of this script on a machine without a GPU.

Needs only numpy, cupy, safetensors and tokenizers (a bare CUDA host has no
network and no venv). Exit status: 0 all PASS, 1 a check failed or the
benchmark crashed, 2 no usable CuPy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from worker.attention import paged_attention
from worker.batch_processor import BatchProcessor, Request, run_to_completion
from worker.channel.types import EngineConfig, SamplingParams
from worker.model import rms_norm, silu
from worker.penalties import penalize
from worker.random_checkpoint import write_checkpoint
from worker.sampling import filtered_probs, sample, sample_from, token_logprobs

TOL = 1e-4  # max |diff| / max |reference|, float32


@dataclass
class Check:
    name: str
    shapes: str
    abs_diff: float
    rel_diff: float
    ok: bool


def to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)  # cupy arrays have .get()


def compare(name: str, shapes: str, ref: Any, got: Any, tol: float = TOL) -> Check:
    """Normalised max difference: max|got - ref| / max|ref| (elementwise relative error
    blows up where the reference is ~0, e.g. masked or padded outputs)."""
    ref, got = to_numpy(ref).astype(np.float64), to_numpy(got).astype(np.float64)
    if ref.shape != got.shape:
        return Check(name, shapes + f" (shape {got.shape} != {ref.shape})", np.inf, np.inf, False)
    abs_diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    rel = abs_diff / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
    ok = bool(np.isfinite(got).all() == np.isfinite(ref).all()) and rel <= tol
    return Check(name, shapes, abs_diff, rel, ok)


def both(xp: ModuleType, fn: Callable[..., Any], *host_args: Any) -> tuple[Any, Any]:
    """fn on NumPy and on xp, same inputs (NumPy arrays are copied to the device)."""
    moved = [xp.asarray(a) if isinstance(a, np.ndarray) else a for a in host_args]
    return fn(np, *host_args), fn(xp, *moved)


# -- attention ---------------------------------------------------------------------------
def attention_inputs(
    rng: np.random.Generator, lengths: list[int], n_q: int, heads: tuple[int, int] = (9, 3)
) -> tuple[np.ndarray, ...]:
    """Random pools and per-sequence block tables (scattered blocks); the last `n_q` tokens
    of each sequence are the queries. q: (B, n_q, H, D), pools: (blocks, 16, KVH, D)."""
    bs, d, (h, kvh) = 16, 64, heads
    per_seq = [-(-n // bs) for n in lengths]
    total = sum(per_seq) + 3
    ids = rng.permutation(total)
    tables = np.zeros((len(lengths), max(per_seq)), dtype=np.int64)  # padding: block 0
    at = 0
    for row, nb in enumerate(per_seq):
        tables[row, :nb] = ids[at : at + nb]
        at += nb
    k_pool = rng.standard_normal((total, bs, kvh, d), dtype=np.float32)
    v_pool = rng.standard_normal((total, bs, kvh, d), dtype=np.float32)
    q = rng.standard_normal((len(lengths), n_q, h, d), dtype=np.float32)
    pos = np.array([np.arange(n - n_q, n) for n in lengths], dtype=np.int64)  # (B, n_q)
    return q, k_pool, v_pool, tables, pos


def attention_checks(xp: ModuleType, rng: np.random.Generator) -> list[Check]:
    cases = [  # name, lengths, queries per sequence, window, tile tokens
        ("paged_attention decode (GQA 9/3)", [5, 37, 300, 129], 1, None, 64),
        ("paged_attention prefill chunk + cached prefix", [128], 48, None, 32),
        ("paged_attention decode, sliding window 40", [5, 37, 300, 129], 1, 40, 64),
        ("paged_attention prefill, sliding window 40", [200], 64, 40, 32),
    ]
    checks = []
    for name, lengths, n_q, window, tile in cases:
        q, k_pool, v_pool, tables, pos = attention_inputs(rng, lengths, n_q)
        n_blocks, scale = tables.shape[1], 1 / np.sqrt(q.shape[-1])
        run = partial(
            paged_attention, num_kv_blocks=n_blocks, scale=scale, window=window, tile_tokens=tile
        )
        ref, got = both(xp, run, q, k_pool, v_pool, tables, pos)
        shapes = f"q {q.shape}, lengths {lengths}, tile {tile}"
        checks.append(compare(name, shapes, ref, got))
    return checks


# -- elementwise -------------------------------------------------------------------------
def elementwise_checks(xp: ModuleType, rng: np.random.Generator) -> list[Check]:
    x = rng.standard_normal((64, 576), dtype=np.float32)
    w = rng.standard_normal(576, dtype=np.float32)
    ref, got = both(xp, lambda m, a, b: rms_norm(m, a, b, 1e-5), x, w)
    checks = [compare("rms_norm", "x (64, 576)", ref, got)]
    wide = rng.standard_normal((64, 1536), dtype=np.float32) * 20  # includes large |x|
    ref, got = both(xp, silu, wide)
    checks.append(compare("silu", "x (64, 1536), abs(x) up to ~90", ref, got))
    return checks


def rope_check(
    xp: ModuleType, rng: np.random.Generator, ref_proc: BatchProcessor, got_proc: BatchProcessor
) -> Check:
    """The model's RoPE (its own cos/sin tables) on random q/k heads at random positions."""
    ref_model, got_model = ref_proc.runner.model, got_proc.runner.model
    heads = ref_model.config.num_heads + ref_model.config.num_kv_heads
    x = rng.standard_normal((37, heads, ref_model.config.head_dim), dtype=np.float32)
    pos = rng.integers(0, ref_model.config.max_position_embeddings, size=37)

    def rope(model: Any, m: ModuleType) -> Any:
        p = m.asarray(pos)
        cos, sin = model.rope_cos[p][:, None, :], model.rope_sin[p][:, None, :]  # (T, 1, D/2)
        return model.apply_rope(m.asarray(x), cos, sin)

    return compare("rope", f"x {x.shape}", rope(ref_model, np), rope(got_model, xp))


# -- sampling ----------------------------------------------------------------------------
def sampling_checks(xp: ModuleType, rng: np.random.Generator) -> list[Check]:
    """filtered_probs + sample_from with the same uniforms. top_p, min_p and the uniforms
    sit midway between two cumulative masses (or probability ratios) of the reference, so
    float rounding cannot move a cut-off or a pick by one token: any token difference is
    a real bug."""
    rows, vocab = 6, 49152
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * 4
    temp = np.array([0.7, 1.0, 1.3, 0.5, 1.0, 0.9], dtype=np.float32)
    top_k = np.array([0, 50, 0, 1000, 1, 0], dtype=np.int64)
    top_p = np.ones(rows, dtype=np.float32)
    min_p = np.zeros(rows, dtype=np.float32)
    _, probs = filtered_probs(np, logits, temp, top_k, top_p, min_p)  # top-k only
    mass_before = np.cumsum(probs, axis=-1) - probs
    for r in (0, 2, 3):  # cut between the tokens around 80% of the mass
        j = int(np.searchsorted(mass_before[r], 0.8))
        top_p[r] = (mass_before[r, j - 1] + mass_before[r, j]) / 2
    ratio = probs[5] / probs[5, 0]  # min-p: keep the 6 most likely tokens of row 5
    min_p[5] = (ratio[5] + ratio[6]) / 2
    order, probs = filtered_probs(np, logits, temp, top_k, top_p, min_p)
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    kept = (probs > 0).sum(axis=-1)
    picks = rng.integers(0, np.minimum(kept, 8))  # a likely rank: its mass dwarfs rounding
    lower = np.where(picks > 0, cdf[np.arange(rows), np.maximum(picks - 1, 0)], 0.0)
    uniform = ((lower + cdf[np.arange(rows), picks]) / 2 / cdf[:, -1]).astype(np.float32)
    expected = order[np.arange(rows), picks]

    def run(
        m: ModuleType, lg: Any, t: Any, k: Any, p: Any, mp: Any, u: Any
    ) -> tuple[Any, Any, Any]:
        o, pr = filtered_probs(m, lg, t, k, p, mp)
        return o, pr, sample_from(m, o, pr, u)

    (_, ref_p, ref_tok), (_, got_p, got_tok) = both(
        xp, run, logits, temp, top_k, top_p, min_p, uniform
    )
    mismatches = int((to_numpy(got_tok) != to_numpy(ref_tok)).sum())
    ref_ok = bool((to_numpy(ref_tok) == expected).all())  # the construction itself worked
    shapes = f"logits ({rows}, {vocab}), top_k {top_k.tolist()}"
    return [
        compare("filtered_probs (ranked probabilities)", shapes, ref_p, got_p),
        Check("sample_from (token mismatches)", shapes, mismatches, 0.0, ref_ok and not mismatches),
    ]


def logprob_checks(xp: ModuleType, rng: np.random.Generator) -> list[Check]:
    """Penalties (a bincount of each row's tokens) and log-probabilities with up to 20
    alternatives, for a mix of rows that ask and rows that do not. Greedy rows only, so the
    picks cannot differ by rounding; the alternatives are compared by value, in rank order
    (tied ids may list in another order, their values cannot)."""
    rows, vocab = 6, 49152
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * 4
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 300, 0, 40, 9, 2000)]
    outputs = [rng.integers(0, 500, n).tolist() for n in (30, 0, 7, 100, 1, 64)]
    params = [
        SamplingParams(repetition_penalty=1.3, logprobs=True, top_logprobs=20),
        SamplingParams(frequency_penalty=0.5, presence_penalty=-0.5),
        SamplingParams(logprobs=True),
        SamplingParams(
            repetition_penalty=0.8, frequency_penalty=2.0, logprobs=True, top_logprobs=5
        ),
        SamplingParams(),
        SamplingParams(repetition_penalty=2.0, presence_penalty=2.0, logprobs=True, top_logprobs=1),
    ]

    def run(m: ModuleType, lg: Any) -> tuple[Any, list[Any]]:
        penalised = penalize(m, lg, params, prompts, outputs)
        tokens = sample(m, penalised, params, list(range(rows)))
        return penalised, token_logprobs(m, penalised, params, tokens)

    (ref_logits, ref_lp), (got_logits, got_lp) = both(xp, run, logits)
    shapes = f"logits ({rows}, {vocab}), histories up to 2064 tokens"
    asked = [r for r, p in enumerate(params) if p.logprobs]
    mismatches = sum(
        (got_lp[r] is None) != (ref_lp[r] is None)
        or (ref_lp[r] is not None and got_lp[r].token_id != ref_lp[r].token_id)
        for r in range(rows)
    )
    flat_ref = [v for r in asked for v in (ref_lp[r].logprob, *(x for _, x in ref_lp[r].top))]
    flat_got = [v for r in asked for v in (got_lp[r].logprob, *(x for _, x in got_lp[r].top))]
    return [
        compare("penalize (logits)", shapes, ref_logits, got_logits),
        compare("token_logprobs (values)", shapes, np.array(flat_ref), np.array(flat_got)),
        Check(
            "token_logprobs (rows or tokens that differ)", shapes, mismatches, 0.0, not mismatches
        ),
    ]


# -- whole engine ------------------------------------------------------------------------
def capture_logits(proc: BatchProcessor) -> list[np.ndarray]:
    """Record each step's (S, vocab) logits on the host (wraps this model's forward)."""
    captured: list[np.ndarray] = []
    model = proc.runner.model
    inner = model.forward

    def forward(step: Any, cache: Any) -> Any:
        logits = inner(step, cache)
        captured.append(to_numpy(logits).copy())
        return logits

    model.forward = forward  # type: ignore[method-assign]
    return captured


def model_checks(ref_proc: BatchProcessor, got_proc: BatchProcessor) -> list[Check]:
    """Prompts of several lengths (a 16-token prefill budget makes chunked prefills with a
    cached prefix), greedy and sampled, through both processors."""
    vocab = ref_proc.model_config.vocab_size
    rng = np.random.default_rng(7)
    sampled = SamplingParams(12, temperature=0.8, top_k=40, top_p=0.9, seed=3, ignore_eos=True)
    requests = [
        Request(f"p{n}", rng.integers(0, vocab, n).tolist(), SamplingParams(12, ignore_eos=True))
        for n in (3, 23, 41)
    ] + [Request("sampled", rng.integers(0, vocab, 19).tolist(), sampled)]
    logits, tokens = [], []
    for proc in (ref_proc, got_proc):
        captured = capture_logits(proc)
        done = run_to_completion(proc, requests)
        tokens.append({k: v.token_ids for k, v in done.items()})
        logits.append(captured)
    steps_match = [a.shape for a in logits[0]] == [b.shape for b in logits[1]]
    stacked = [np.concatenate(x) if steps_match else np.zeros(1) for x in logits]
    check = compare("model logits (all steps)", f"{len(logits[0])} steps", *stacked)
    check.ok &= steps_match
    mismatches = sum(
        sum(a != b for a, b in zip(tokens[0][k], tokens[1][k], strict=False))
        + abs(len(tokens[0][k]) - len(tokens[1][k]))
        for k in tokens[0]
    )
    shapes = f"{len(requests)} prompts x 12 tokens (3 greedy, 1 sampled)"
    return [check, Check("model tokens (mismatches)", shapes, mismatches, 0.0, mismatches == 0)]


def batch_invariance_report(model_dir: Path, device: str) -> str:
    """Does batch_invariant hold on this device? A request's logits alone vs beside 8 others."""
    from batch_invariance_probe import target_logits  # scripts/ is on sys.path

    def engine() -> BatchProcessor:
        config = EngineConfig(16, None, 16, 16, 48, device, batch_invariant=True)
        return BatchProcessor.from_model_dir(model_dir, config)

    try:
        alone_proc, batch_proc = engine(), engine()
    except RuntimeError as err:  # the start-up check of the BLAS's kernels
        return f"not available ({err})"
    rng = np.random.default_rng(3)
    target = rng.integers(1, 500, 24).tolist()
    others = [rng.integers(1, 500, int(n)).tolist() for n in rng.integers(2, 60, 8)]
    alone = target_logits(alone_proc, target, [])
    batched = target_logits(batch_proc, target, others)
    differ = sum(not np.array_equal(alone[i], batched[i]) for i in alone)
    return f"{differ} of {len(alone)} tokens' logits differ alone vs beside 8 requests"


def print_checks(title: str, checks: list[Check]) -> None:
    print(f"\n### {title}\n")
    print("| check | shapes | max abs diff | max rel diff | result |\n|---|---|---|---|---|")
    for c in checks:
        result = "PASS" if c.ok else "FAIL"
        print(f"| {c.name} | {c.shapes} | {c.abs_diff:.3g} | {c.rel_diff:.3g} | {result} |")


def load_xp(name: str | None) -> ModuleType | None:
    """The array module under test: cupy with a visible device, or numpy for a dry run."""
    if name == "numpy":
        return np
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as err:  # ImportError, or CUDA driver errors on a GPU-less host
        print(f"gpu_check: CuPy is not usable here ({type(err).__name__}: {err}).")
        return None
    print("gpu_check: CuPy sees no CUDA device.")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--xp", choices=["cupy", "numpy"], default=None, help="default: cupy")
    ap.add_argument("--skip-bench", action="store_true", help="kernel and model checks only")
    ap.add_argument("--bench-quick", action="store_true", help="run the benchmark with --quick")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    xp = load_xp(args.xp)
    if xp is None:
        print("Run it on a CUDA machine, or pass --xp numpy for a dry run against NumPy.")
        return 2
    device = "cuda" if xp.__name__ == "cupy" else "cpu"
    print(f"# GPU check: numpy {np.__version__} vs {xp.__name__} {xp.__version__}")

    rng = np.random.default_rng(args.seed)
    checks = attention_checks(xp, rng) + elementwise_checks(xp, rng)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp) / "default", "default")

        def processor(dev: str) -> BatchProcessor:
            config = EngineConfig(4, None, 16, 16, prefill_token_budget=16, device=dev)
            return BatchProcessor.from_model_dir(model_dir, config)

        ref_proc, got_proc = processor("cpu"), processor(device)
        checks.append(rope_check(xp, rng, ref_proc, got_proc))
        checks += sampling_checks(xp, rng)
        checks += logprob_checks(xp, rng)
        checks += model_checks(ref_proc, got_proc)
        invariance = batch_invariance_report(model_dir, device)
    print_checks(f"Kernels and model: numpy vs {xp.__name__} (rel = max|diff| / max|ref|)", checks)
    failed = [c.name for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks PASS", flush=True)
    print(f"\nBatch invariance on {device} (reported, not a check): {invariance}", flush=True)

    status = 1 if failed else 0
    if not args.skip_bench:
        import bench_engine  # scripts/ is on sys.path: this file's directory

        try:
            bench_engine.main(["--device", device] + (["--quick"] if args.bench_quick else []))
        except Exception as err:
            print(f"gpu_check: the benchmark failed: {type(err).__name__}: {err}")
            status = 1
    if failed:
        print("FAILED: " + ", ".join(failed))
    return status


if __name__ == "__main__":
    sys.exit(main())
