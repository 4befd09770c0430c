"""The benchmark and GPU-check scripts run end to end on the CPU.

They are run as subprocesses, the way `make bench` / `make gpu-check` run them.
Timings are never asserted on: only that every table is printed and every
check passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / args[0]), *args[1:]]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| ")]


def test_gpu_check_dry_run_passes_every_check() -> None:
    result = run_script("gpu_check.py", "--xp", "numpy", "--skip-bench")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    results = [row.rstrip(" |").rsplit("| ", 1)[-1] for row in rows[1:]]  # skip the header
    assert len(results) >= 10 and set(results) == {"PASS"}, result.stdout
    names = " ".join(rows)
    for kernel in ("paged_attention", "rms_norm", "silu", "rope", "sample_from", "model logits"):
        assert kernel in names


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_gpu_check_without_cupy_says_so_and_exits_2() -> None:
    result = run_script("gpu_check.py", "--skip-bench")
    assert result.returncode == 2
    assert "--xp numpy" in result.stdout


def test_bench_features_quick_prints_every_mode(default_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "features.json"
    args = ["--quick", "--device", "cpu", "--model", str(default_model), "--batch-sizes", "1,3"]
    result = run_script("bench_features.py", *args, "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Decode step by what the batch asks for" in result.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 5 and {r["batch"] for r in rows} == {1, 3}
    assert [r["ratio"] for r in rows if r["mode"] == "nobody asks, bypassed"] == [1.0, 1.0]


def test_bench_engine_quick_prints_every_table(default_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--device", "cpu", "--model", str(default_model), "--batch-sizes", "1,2,32"]
    args += ["--requests", "8", "--max-batch", "4", "--profile", "--json", str(out)]
    result = run_script("bench_engine.py", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    for title in (
        "Machine and ceilings",
        "Decode scaling",
        "Prefill",
        "Continuous vs static batching",
        "Targets",
        "cProfile: batch 32",
        "Matmuls alone",
    ):
        assert f"### {title}" in result.stdout, title
    data = json.loads(out.read_text())
    assert [row["batch"] for row in data["decode"]] == [1, 2, 32]
    assert data["batching"]["requests"] == 8 and data["batching"]["tokens"] > 0
    # Which way a target goes depends on the machine; that the verdict follows from the
    # measured and required values does not (ties within the printed rounding are skipped).
    assert len(data["targets"]) == 3
    for target in data["targets"]:
        measured, goal = float(target["measured"]), float(target["required"].removeprefix(">= "))
        if abs(measured - goal) > 0.005:
            assert target["result"] == ("PASS" if measured >= goal else "MISS"), target
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_gflops"] > 0


def test_bench_speculative_quick_prints_the_table_with_the_same_tokens(
    default_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "spec.json"
    args = ["--quick", "--device", "cpu", "--model", str(default_model), "--json", str(out)]
    result = run_script("bench_speculative.py", *args, "--draft-model", str(default_model))
    assert result.returncode == 0, result.stdout + result.stderr  # 0: every mode's tokens agree
    assert "### Greedy, 12 new tokens per request" in result.stdout
    records = json.loads(out.read_text())
    cells = {(r["workload"], r["batch"], r["mode"]) for r in records}
    assert cells == {
        (w, b, m) for w in ("copy", "open") for b in (1, 2) for m in ("plain", "ngram", "draft")
    }
    assert all(r["same"] == "yes" for r in records)
    drafted = [r for r in records if r["mode"] == "draft"]
    assert all(r["draft_tokens"] > 0 for r in drafted)  # the model drafting for itself


def test_bench_prefix_cache_quick_prints_both_tables(default_model: Path) -> None:
    args = ["--quick", "--device", "cpu", "--model", str(default_model)]
    result = run_script("bench_prefix_cache.py", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "### Machine and ceilings" in result.stdout
    assert (
        "### Shared system prompt" in result.stdout
        and "(outputs with and without: identical)" in result.stdout
    )
    rows = table_rows(result.stdout)
    shared = [r for r in rows if r.startswith(("| off |", "| on |"))]
    assert len(shared) == 2
    assert shared[0].endswith("| 336 of 336 |")  # 6 x (48 + 8) tokens, all computed
    assert shared[1].endswith("| 96 of 336 |")  # the 48-token system prompt once (3 blocks)
    turns = [r for r in rows if r.split("|")[1].strip() in ("1", "2", "3")]
    assert len(turns) == 3 and all(r.endswith("| yes |") for r in turns)
    assert [r.split("|")[3].strip() for r in turns] == ["0", "48", "64"]  # cached per turn


def test_bench_batch_invariant_quick_prints_both_modes(default_model: Path) -> None:
    proc = run_script("bench_batch_invariant.py", "--quick", "--model", str(default_model))
    assert proc.returncode == 0, proc.stderr
    assert "### Default vs batch-invariant" in proc.stdout
    for work in ("decode, batch 1", "decode, batch 16", "prefill, 64 tokens"):
        assert f"| {work} |" in proc.stdout
