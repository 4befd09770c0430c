"""Paged, tiled attention equals a dense full-matrix reference."""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_attention

from worker.attention import paged_attention

BLOCK = 4


def scatter_to_pool(rng: np.random.Generator, seqs_kv: list[np.ndarray], num_blocks: int):
    """Place each sequence's (L, kvh, D) keys into random, non-contiguous blocks of a pool."""
    kvh, dim = seqs_kv[0].shape[1:]
    pool = rng.standard_normal((num_blocks, BLOCK, kvh, dim)).astype(np.float32)  # junk elsewhere
    free = list(rng.permutation(num_blocks))
    tables = []
    for kv in seqs_kv:
        n = -(-len(kv) // BLOCK)
        table = [int(free.pop()) for _ in range(n)]
        for t in range(len(kv)):
            pool[table[t // BLOCK], t % BLOCK] = kv[t]
        tables.append(table)
    return pool, tables


def padded(tables: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(tables), max(map(len, tables))), dtype=np.int64)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_batch_matches_dense(heads: int, kv_heads: int, window: int | None) -> None:
    rng = np.random.default_rng(heads * 10 + kv_heads)
    dim, lengths = 8, [1, 5, 17, 30]
    ks = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) for n in lengths]
    vs = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) for n in lengths]
    k_pool, tables = scatter_to_pool(rng, ks, 40)
    v_pool = np.zeros_like(k_pool)
    for kv, table in zip(vs, tables, strict=True):
        for t in range(len(kv)):
            v_pool[table[t // BLOCK], t % BLOCK] = kv[t]
    q = rng.standard_normal((len(lengths), 1, heads, dim)).astype(np.float32)
    pos = np.array([[n - 1] for n in lengths])
    out = paged_attention(
        np,
        q,
        k_pool,
        v_pool,
        padded(tables),
        pos,
        max(map(len, tables)),
        dim**-0.5,
        window=window,
        tile_tokens=8,  # several tiles per sequence
    )
    for b, n in enumerate(lengths):
        ref = dense_attention(q[b].astype(np.float64), ks[b], vs[b], np.array([n - 1]), window)
        np.testing.assert_allclose(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_prefill_chunk_with_cached_prefix_matches_dense(window: int | None) -> None:
    rng = np.random.default_rng(1)
    heads, kv_heads, dim, total, prefix = 4, 2, 16, 37, 21
    k = rng.standard_normal((total, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((total, kv_heads, dim)).astype(np.float32)
    k_pool, tables = scatter_to_pool(rng, [k], 16)
    v_pool, _ = scatter_to_pool(np.random.default_rng(0), [v], 16)
    v_pool[:] = 0
    for t in range(total):
        v_pool[tables[0][t // BLOCK], t % BLOCK] = v[t]
    q = rng.standard_normal((1, total - prefix, heads, dim)).astype(np.float32)
    pos = np.arange(prefix, total)[None]
    out = paged_attention(
        np,
        q,
        k_pool,
        v_pool,
        padded(tables),
        pos,
        len(tables[0]),
        dim**-0.5,
        window=window,
        tile_tokens=8,
    )
    ref = dense_attention(q[0].astype(np.float64), k, v, pos[0], window)
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5)


def test_query_hidden_from_a_whole_tile_stays_exact() -> None:
    """A sliding window can hide every key of an early tile from a late query."""
    rng = np.random.default_rng(2)
    k = rng.standard_normal((40, 1, 8)).astype(np.float32)
    pool = k.reshape(10, BLOCK, 1, 8)
    q = rng.standard_normal((1, 1, 2, 8)).astype(np.float32) * 30  # sharp softmax
    out = paged_attention(
        np, q, pool, pool, np.arange(10)[None], np.array([[39]]), 10, 1.0, window=3, tile_tokens=8
    )
    ref = dense_attention(q[0].astype(np.float64) * np.sqrt(8), k, k, np.array([39]), window=3)
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-6)


def test_tiles_bound_the_score_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt never builds a (len x len) score matrix: scores stay (Q x tile)."""
    rng = np.random.default_rng(3)
    n = 256
    pool = rng.standard_normal((n // BLOCK, BLOCK, 1, 8)).astype(np.float32)
    table = np.arange(n // BLOCK)[None]
    q = rng.standard_normal((1, n, 1, 8)).astype(np.float32)
    seen: list[tuple[int, ...]] = []
    real_where = np.where

    def spy_where(cond, a, b):  # type: ignore[no-untyped-def]
        result = real_where(cond, a, b)
        seen.append(result.shape)
        return result

    import types

    xp = types.SimpleNamespace(
        **{name: getattr(np, name) for name in dir(np) if not name.startswith("__")}
    )
    xp.where = spy_where
    out = paged_attention(
        xp, q, pool, pool, table, np.arange(n)[None], n // BLOCK, 8**-0.5, tile_tokens=32
    )
    largest = max(int(np.prod(s)) for s in seen)
    assert largest <= n * 32  # one (Q x tile) block, never (Q x n)
    ref = dense_attention(
        q[0].astype(np.float64), pool.reshape(n, 1, 8), pool.reshape(n, 1, 8), np.arange(n)
    )
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)
