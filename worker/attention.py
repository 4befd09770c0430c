"""Paged, tiled attention with an online softmax, over NumPy or CuPy.

One kernel serves both phases:
- decode: B sequences, one query each (Q = 1), batched in one call;
- prefill: one sequence, a chunk of Q new queries attending to its cached
  prefix plus the chunk itself (the chunk's K/V are written to the cache first).

Keys are visited a tile of blocks at a time and folded into a running max /
running sum (the flash-attention recurrence), so a long prompt never builds
a full (len x len) score matrix: the largest temporary is (Q x tile_tokens)
per head. Grouped-query and multi-query attention share one K/V head among
`group = n_heads // n_kv_heads` query heads by folding the group into the
query axis.

Visibility is decided by positions alone: key j is visible from a query at
position i when j <= i (causal) and, with a sliding window W, i - j < W.
Hidden scores get a large finite negative value rather than -inf: a row that
sees nothing in one tile then carries weight exp(-1e30 - max) = 0 into the
next, with no inf - inf to guard against. (Every query sees at least its own
key, so no output row is an average over nothing.)

Batch invariance (`batch_invariant=True`, docs/batch-invariance.md): a query
row's result must not depend on the other rows of the call, nor on whether
it is computed as a decode step or inside a prefill chunk of any size. Tiles
start at block 0 for every query, so the online-softmax recurrence is the
same for a token wherever it is computed; what varies is the width of the
last tile (it follows the longest sequence of a decode batch, or the end of
a prefill chunk), and NumPy's pairwise row sum rounds differently over a
wider tile with extra zeros. So the row sum is taken by the same kind of
product as probs @ V (a product sums over its K axis in one sequential run
for the tile widths used here, where extra zero terms change nothing), a
tile holds a multiple of KEY_ALIGN keys, K^T is made row-major for the
score product, and a lone query row is padded (worker/matmul.py says why).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from worker.matmul import check_attention_invariance, matmul

Array = Any
MASKED = np.float32(-1e30)
TILE_TOKENS = 256  # keys per tile (rounded down to whole blocks, at least one)
SUM_COLUMNS = 16  # ones columns of the batch-invariant row sum (row_sums)
# Batch-invariant tiles hold a multiple of this many keys: OpenBLAS's score product gives a
# row other bits over 24 or 40 keys than over 256, never over 16, 32, ... (measured).
KEY_ALIGN = 16


def tile_blocks(block_size: int, tile_tokens: int = TILE_TOKENS) -> int:
    return max(1, tile_tokens // block_size)


def check_batch_invariance(xp: ModuleType, head_dim: int, block_size: int) -> None:
    """The BLAS facts batch-invariant attention relies on, at this model's shapes
    (worker/matmul.py); RuntimeError naming the shape if one fails."""
    keys = aligned_blocks(tile_blocks(block_size), block_size) * block_size
    key_axis = [(keys, head_dim), (keys, SUM_COLUMNS)]  # probs @ V, the row sums
    check_attention_invariance(xp, (head_dim, keys), key_axis, KEY_ALIGN)


def aligned_blocks(blocks: int, block_size: int) -> int:
    """Blocks rounded up so they hold a multiple of KEY_ALIGN keys."""
    unit = KEY_ALIGN // math.gcd(KEY_ALIGN, block_size)
    return -(-blocks // unit) * unit


def row_sums(xp: ModuleType, probs: Array, batch_invariant: bool) -> Array:
    """(..., rows, L) -> (..., rows, 1): each row's sum.

    Batch-invariant: as a product with a ones matrix, which adds the terms in
    the same order for any L, so zeros past a row's last visible key change
    nothing. 16 columns: narrower ones go to OpenBLAS kernels that keep
    neither property (measured; check_batch_invariance tests it at start).
    """
    if not batch_invariant:
        return probs.sum(axis=-1, keepdims=True)
    ones = xp.ones((probs.shape[-1], SUM_COLUMNS), dtype=probs.dtype)  # (L, 16)
    return matmul(xp, probs, ones, 2)[..., :1]


def paged_attention(
    xp: ModuleType,
    q: Array,
    k_pool: Array,
    v_pool: Array,
    block_tables: Array,
    q_positions: Array,
    num_kv_blocks: int,
    scale: float,
    window: int | None = None,
    tile_tokens: int = TILE_TOKENS,
    batch_invariant: bool = False,
) -> Array:
    """Attention of queries against their sequences' paged keys and values.

    q:            (B, Q, n_heads, head_dim)
    k_pool/v_pool:(num_blocks, block_size, n_kv_heads, head_dim)
    block_tables: (B, max_blocks) int, padded with any valid block id
    q_positions:  (B, Q) int, absolute position of each query
    num_kv_blocks: how many leading table entries hold keys (a host int, so
                  the loop bound never needs a device sync)
    batch_invariant: row sums as products, row-major K^T, no one-row products (above)
    returns       (B, Q, n_heads, head_dim)
    """
    batch, n_q, n_heads, head_dim = q.shape
    block_size, n_kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = n_heads // n_kv_heads
    rows = group * n_q

    # (B, Q, kvh, group, D) -> (B, kvh, group, Q, D) -> (B, kvh, group*Q, D)
    qg = q.reshape(batch, n_q, n_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, n_kv_heads, rows, head_dim) * np.float32(scale)

    q_pos = q_positions[:, None, None, :, None]  # (B, 1, 1, Q, 1)
    tile_width = tile_blocks(block_size, tile_tokens)
    min_rows = 2 if batch_invariant else 1
    run_max = run_sum = acc = None
    for first in range(0, num_kv_blocks, tile_width):
        tile = block_tables[:, first : first + tile_width]  # (B, nb)
        if batch_invariant and (width := aligned_blocks(tile.shape[1], block_size)) > tile.shape[1]:
            tile = xp.pad(tile, ((0, 0), (0, width - tile.shape[1])))  # masked keys, see KEY_ALIGN
        n_keys = tile.shape[1] * block_size
        # (B, nb, bs, kvh, D) -> (B, L, kvh, D) -> K^T (B, kvh, D, L) and V (B, kvh, L, D)
        k = k_pool[tile].reshape(batch, n_keys, n_kv_heads, head_dim).transpose(0, 2, 3, 1)
        if batch_invariant:  # row-major K^T: BLAS then picks its kernel by size alone
            k = xp.ascontiguousarray(k)
        v = v_pool[tile].reshape(batch, n_keys, n_kv_heads, head_dim).transpose(0, 2, 1, 3)

        key_pos = xp.arange(first * block_size, first * block_size + n_keys)  # (L,)
        visible = key_pos <= q_pos  # (B, 1, 1, Q, L)
        if window is not None:
            visible &= key_pos > q_pos - window

        scores = matmul(xp, qg, k, min_rows)  # (B, kvh, rows, L)
        scores = scores.reshape(batch, n_kv_heads, group, n_q, n_keys)  # (B, kvh, g, Q, L)
        scores = xp.where(visible, scores, MASKED).reshape(batch, n_kv_heads, rows, n_keys)
        tile_max = scores.max(axis=-1, keepdims=True)  # (B, kvh, rows, 1)
        if acc is None:  # first tile: nothing to rescale yet
            run_max = tile_max
            probs = xp.exp(scores - run_max)  # (B, kvh, rows, L)
            run_sum = row_sums(xp, probs, batch_invariant)  # (B, kvh, rows, 1)
            acc = matmul(xp, probs, v, min_rows)  # (B, kvh, rows, D)
            continue
        new_max = xp.maximum(run_max, tile_max)
        rescale = xp.exp(run_max - new_max)  # (B, kvh, rows, 1): earlier tiles' weight
        probs = xp.exp(scores - new_max)
        run_sum = run_sum * rescale + row_sums(xp, probs, batch_invariant)
        acc = acc * rescale + matmul(xp, probs, v, min_rows)
        run_max = new_max

    out = acc / run_sum  # (B, kvh, group*Q, D)
    # (B, kvh, group*Q, D) -> (B, kvh, group, Q, D) -> (B, Q, kvh, group, D)
    out = out.reshape(batch, n_kv_heads, group, n_q, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, n_q, n_heads, head_dim)
